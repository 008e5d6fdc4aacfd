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
