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


def cross_entropy_partials_ref(logits, target_local, valid_columns):
    """Per-row ``(max, sum of exp(logits - max), logits[target_local])`` over the first
    ``valid_columns`` columns of ``logits`` [T, Vl], as a [T, 3] tensor (float32; float64 for
    float64 logits): max -inf and sum 0 when no column counts, target logit 0 where target_local is
    -1."""
    acc = _acc(logits)
    stats = torch.zeros(logits.shape[0], 3, dtype=acc, device=logits.device)
    if valid_columns == 0:
        stats[:, 0] = float("-inf")
        return stats
    x = logits[:, :valid_columns].to(acc)
    row_max = x.amax(dim=-1)
    # A row of -inf only sums exp(-inf - 0) = 0, not exp(-inf + inf) = NaN.
    shift = torch.where(row_max == float("-inf"), 0, row_max)
    has_target = target_local >= 0
    picked = x.gather(1, torch.where(has_target, target_local, 0)[:, None]).squeeze(1)
    stats[:, 0] = row_max
    stats[:, 1] = (x - shift[:, None]).exp().sum(dim=-1)
    stats[:, 2] = torch.where(has_target, picked, 0)
    return stats


def cross_entropy_grad_from_stats_ref_(logits, target_local, valid_columns, row_max, row_scale):
    """In place: the first ``valid_columns`` columns of ``logits`` [T, Vl] become ``exp(logits -
    row_max) * row_scale - onehot(target_local)`` (no one-hot where target_local is -1), the rest 0.
    Rows with a zero scale keep only their one-hot: no exp there, so a -inf max or non-finite logits
    leave no NaN."""
    if valid_columns:
        live = (row_scale != 0)[:, None]
        probs = (logits[:, :valid_columns].to(row_max.dtype) - row_max[:, None]).exp() * row_scale[:, None]
        grad = torch.where(live, probs, 0)
        has_target = target_local >= 0
        onehot = -has_target.to(grad.dtype)[:, None]
        grad.scatter_add_(1, torch.where(has_target, target_local, 0)[:, None], onehot)
        logits[:, :valid_columns] = grad
    logits[:, valid_columns:] = 0


def wgrad_accumulate_ref(main_grad, grad_out, x):
    """``main_grad += grad_out.T @ x``; a ``main_grad`` wider than the inputs gets their product
    rounded to the inputs' dtype, then added."""
    if main_grad.dtype == x.dtype:
        main_grad.addmm_(grad_out.t(), x)
    else:
        main_grad.add_(grad_out.t() @ x)
