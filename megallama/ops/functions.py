"""Autograd Functions over the fused kernels, and the functional API the model calls.

Each Function saves only what its backward cannot cheaply recompute: RMSNorm keeps x and the
per-row rstd (not y), SwiGLU keeps its inputs and recomputes silu, rotary keeps only cos/sin.
"""
import torch

from megallama.ops import kernels


def _rows_ready(t):
    """Gradients that autograd hands over may be expanded or transposed; the kernels need
    stride 1 in the last dim, so only those are copied."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x = _rows_ready(x)
        y, rstd = kernels.rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, rstd)
        # The weight is a parameter that lives anyway: kept as an attribute so the activations
        # this Function saves are exactly x and rstd.
        ctx.weight = weight.detach()
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, rstd = ctx.saved_tensors
        grad_x, grad_weight = kernels.rms_norm_backward(_rows_ready(grad_y), x, ctx.weight, rstd)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_weight if ctx.needs_input_grad[1] else None, None)


class SwiGLUPackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ab):
        ab = _rows_ready(ab)
        ctx.save_for_backward(ab)
        return kernels.swiglu_forward(ab)

    @staticmethod
    def backward(ctx, grad_out):
        (ab,) = ctx.saved_tensors
        return kernels.swiglu_backward(_rows_ready(grad_out), ab)


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return (kernels.rope_forward(_rows_ready(q), cos, sin),
                kernels.rope_forward(_rows_ready(k), cos, sin))

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        dq = kernels.rope_backward(_rows_ready(grad_q), cos, sin) if ctx.needs_input_grad[0] else None
        dk = kernels.rope_backward(_rows_ready(grad_k), cos, sin) if ctx.needs_input_grad[1] else None
        return dq, dk, None, None


def rms_norm(x, weight, eps):
    """RMSNorm over the last dim: ``x * rsqrt(mean(x^2) + eps) * weight``."""
    return RMSNormFunction.apply(x, weight, eps)


def swiglu_packed(ab):
    """``silu(a) * b`` where ``ab`` [..., 2f] packs a (first f columns) and b (last f)."""
    return SwiGLUPackedFunction.apply(ab)


def apply_rotary(q, k, cos, sin):
    """Rotary embedding (rotate-half pairs) of q and k [b, s, h, d] with cos/sin float32 [s, d/2].
    The outputs have shape [b, s, h, d] laid out as contiguous [b, h, s, d]: ``q_out.transpose(1,
    2)`` is contiguous, ready for scaled_dot_product_attention."""
    return RotaryFunction.apply(q, k, cos, sin)
