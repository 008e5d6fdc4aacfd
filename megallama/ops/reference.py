"""Plain-torch forms of the fused ops: the test oracle, and the fallback on devices without kernels.

Every form computes in fp32 (fp64 for fp64 inputs) and rounds once to the input dtype, as the
kernels do. ``cos``/``sin`` are ``[seq, head_dim/2]``; rotation pairs are (i, i + head_dim/2), the
rotate-half layout of Hugging Face's LLaMA.
"""
import torch
import torch.nn.functional as F


def _acc(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rms_norm_ref(x, weight, eps):
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim."""
    y, _ = rms_norm_fwd_ref(x, weight, eps)
    return y


def rms_norm_fwd_ref(x, weight, eps):
    """Returns ``(y, rstd)`` like the kernel: rstd per row, in the accumulation dtype."""
    xf = x.to(_acc(x))
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    y = xf * rstd.unsqueeze(-1) * weight.to(xf.dtype)
    return y.to(x.dtype), rstd


def rms_norm_bwd_ref(grad_y, x, weight, rstd):
    """Closed-form backward of :func:`rms_norm_ref`: ``(grad_x, grad_weight)``."""
    acc = _acc(x)
    g, xf, w = grad_y.to(acc), x.to(acc), weight.to(acc)
    r = rstd.to(acc).unsqueeze(-1)
    gw = g * w
    dot = (gw * xf).sum(-1, keepdim=True)
    grad_x = r * gw - xf * r.pow(3) * dot / x.shape[-1]
    grad_weight = (g * xf * r).reshape(-1, x.shape[-1]).sum(0)
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)


def swiglu_ref(a, b):
    """``silu(a) * b``."""
    acc = _acc(a)
    return (F.silu(a.to(acc)) * b.to(acc)).to(a.dtype)


def swiglu_bwd_ref(grad_out, a, b):
    """Closed-form backward of :func:`swiglu_ref`: ``(grad_a, grad_b)``."""
    acc = _acc(a)
    g, af, bf = grad_out.to(acc), a.to(acc), b.to(acc)
    s = torch.sigmoid(af)
    grad_a = g * bf * s * (1 + af * (1 - s))
    grad_b = g * af * s
    return grad_a.to(a.dtype), grad_b.to(b.dtype)


def rope_ref(x, cos, sin, inverse=False):
    """Rotates ``x`` [batch, seq, heads, head_dim] by +theta (by -theta when ``inverse``, which is
    the backward: the rotation is orthogonal)."""
    acc = _acc(x)
    c = torch.cat([cos, cos], -1).to(acc)[None, :, None, :]
    s = torch.cat([sin, sin], -1).to(acc)[None, :, None, :]
    if inverse:
        s = -s
    xf = x.to(acc)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * c + rotated * s).to(x.dtype)


def cross_entropy_unit_grad_ref(logits, target, ignore_index):
    """In place: overwrites ``logits`` [T, V] with ``softmax(logits) - onehot(target)`` (the
    gradient of the per-row cross-entropy for a unit upstream gradient) and returns the per-row
    loss ``logsumexp(logits) - logits[target]`` (float32; float64 for float64 logits). Rows whose
    target is ``ignore_index`` get loss 0 and a zero row."""
    acc = _acc(logits)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target))[:, None]
    logits_acc = logits.to(acc)  # logits itself when already in acc: then the ops below are in place
    target_logit = logits_acc.gather(1, safe_target)
    row_max = logits_acc.amax(dim=-1, keepdim=True)
    # One exp pass serves both the log-sum-exp and the softmax.
    probs = logits_acc.sub_(row_max).exp_()
    sum_exp = probs.sum(dim=-1, keepdim=True)
    loss = torch.where(valid, (row_max + sum_exp.log() - target_logit).squeeze(1), 0)
    probs.div_(sum_exp).scatter_add_(1, safe_target, torch.full_like(target_logit, -1))
    probs.masked_fill_(~valid[:, None], 0)
    if logits_acc is not logits:
        logits.copy_(probs)
    return loss


def wgrad_accumulate_ref(main_grad, grad_out, x):
    """``main_grad += grad_out.T @ x``; a ``main_grad`` wider than the inputs gets their product
    rounded to the inputs' dtype, then added."""
    if main_grad.dtype == x.dtype:
        main_grad.addmm_(grad_out.t(), x)
    else:
        main_grad.add_(grad_out.t() @ x)
