"""Raw kernel callers: no autograd, for hand-written backwards that manage their own buffers.

Dispatch: a CPU tensor runs the C++ kernel; a CUDA tensor runs the CUDA kernel when the extension
was built with one (``has_cuda()``), else the plain-torch form of :mod:`megallama.ops.reference`;
any other device runs the plain-torch form. The kernels need stride 1 in the last dim (rows may
be strided) and raise a RuntimeError naming the problem otherwise.
"""
import torch

from megallama.ops import reference as ref
from megallama.ops._ext import _ops
from megallama.rope import RopeScaling, scale_inv_freq


def has_cuda():
    """Whether the extension was built with its CUDA kernels."""
    return bool(_ops.has_cuda())


def _use_kernel(t):
    kind = t.device.type
    return kind == "cpu" or (kind == "cuda" and _ops.has_cuda())


def rms_norm_forward(x, weight, eps):
    """``(y, rstd)``: y = x * rstd * weight over the last dim, rstd = 1/sqrt(mean(x^2)+eps) per row
    (float32; float64 for a float64 x). y has x's dtype and is contiguous."""
    if _use_kernel(x):
        return _ops.rms_norm_fwd(x, weight, float(eps))
    return ref.rms_norm_fwd_ref(x, weight, eps)


def rms_norm_backward(grad_y, x, weight, rstd):
    """``(grad_x, grad_weight)``; grad_weight is accumulated in fp32 and returned in weight's dtype."""
    if _use_kernel(x):
        return _ops.rms_norm_bwd(grad_y, x, weight, rstd)
    return ref.rms_norm_bwd_ref(grad_y, x, weight, rstd)


def swiglu_forward(ab):
    """``silu(a) * b`` where ``ab`` [..., 2f] packs a (first f columns) and b (last f)."""
    if _use_kernel(ab):
        return _ops.swiglu_fwd(ab)
    f = _packed_half(ab)
    return ref.swiglu_ref(ab[..., :f], ab[..., f:])


def swiglu_backward(grad_out, ab):
    """``grad_ab`` [..., 2f], contiguous, for the packed ``ab`` of :func:`swiglu_forward`."""
    if _use_kernel(ab):
        return _ops.swiglu_bwd(grad_out, ab)
    f = _packed_half(ab)
    return torch.cat(ref.swiglu_bwd_ref(grad_out, ab[..., :f], ab[..., f:]), dim=-1)


def cross_entropy_unit_grad_(logits, target, ignore_index):
    """Fused softmax cross-entropy, in place: overwrites ``logits`` [T, V] (float32, bfloat16,
    float16 or float64; stride 1 in the last dim, rows may be strided) with ``softmax(logits) -
    onehot(target)``, the loss's gradient for a unit upstream gradient, in its own dtype, and
    returns the per-row loss ``logsumexp - logits[target]``, a new [T] float32 tensor (float64 for
    float64 logits). Rows whose int64 target is ``ignore_index`` get loss 0 and a zero row; any
    other target must lie in [0, V) (a RuntimeError on CPU, a device assert on CUDA)."""
    if _use_kernel(logits):
        return _ops.cross_entropy_unit_grad(logits, target, int(ignore_index))
    return ref.cross_entropy_unit_grad_ref(logits, target, ignore_index)


def cross_entropy_partials(logits, target_local, valid_columns):
    """Phase 1 of the cross-entropy over logits split along the vocabulary across tensor-parallel
    ranks: for this rank's ``logits`` [T, Vl] (dtypes and layout as :func:`cross_entropy_unit_grad_`),
    of which only the first ``valid_columns`` columns are vocabulary (the rest padding), returns a
    new contiguous [T, 3] float32 tensor (float64 for float64 logits) of per-row (max, sum of
    exp(logit - max), the logit at ``target_local``): max -inf and sum 0 where ``valid_columns`` is
    0, target logit 0 where the int64 ``target_local`` is -1 (the target is another rank's, or the
    row is ignored). Any other target_local must lie in [0, valid_columns) (a RuntimeError on CPU, a
    device assert on CUDA). The caller all-reduces these: M = max of maxes, S = sum of sums times
    exp(max - M), the target logits summed; the loss is M + log S - target logit."""
    if _use_kernel(logits):
        return _ops.cross_entropy_partials(logits, target_local, int(valid_columns))
    return ref.cross_entropy_partials_ref(logits, target_local, valid_columns)


def cross_entropy_grad_from_stats_(logits, target_local, valid_columns, row_max, row_scale):
    """Phase 2, in place: overwrites this rank's ``logits`` [T, Vl] with ``exp(logits - row_max) *
    row_scale - onehot(target_local)`` in its first ``valid_columns`` columns and zeros in the rest,
    in its own dtype. ``row_max`` and ``row_scale`` are contiguous [T] float32 (float64 for float64
    logits): the global max and 1 / the global sum of a row that counts; an ignored row is given
    scale 0 and target_local -1 and becomes zeros, whatever its max (-inf too) and logits."""
    if _use_kernel(logits):
        _ops.cross_entropy_grad_from_stats(logits, target_local, int(valid_columns), row_max, row_scale)
    else:
        ref.cross_entropy_grad_from_stats_ref_(logits, target_local, valid_columns, row_max, row_scale)


def has_fp32_wgrad_gemm():
    """Whether :func:`wgrad_accumulate_` adds bfloat16/float16 CUDA products straight into a
    float32 ``main_grad`` (torch's addmm with an fp32 output: built against torch >= 2.8, and not
    refused by it since; a refusal is warned about once and the 16-bit product added instead)."""
    return bool(_ops.has_fp32_wgrad_gemm())


def wgrad_accumulate_(main_grad, grad_out, x):
    """``main_grad += grad_out.T @ x`` for grad_out [T, out] and x [T, in] (one dtype, stride 1 in
    the last dim) into main_grad [out, in] (contiguous; float32 or the inputs' dtype): a weight's
    gradient accumulated over micro-batches. With 16-bit CUDA inputs and a float32 main_grad the
    GEMM accumulates the product into it in fp32 when :func:`has_fp32_wgrad_gemm`; otherwise the
    16-bit product is made, then added."""
    if _use_kernel(x):
        _ops.wgrad_accumulate(main_grad, grad_out, x)
    else:
        ref.wgrad_accumulate_ref(main_grad, grad_out, x)


def _packed_half(ab):
    if ab.shape[-1] % 2:
        raise ValueError("swiglu: the packed tensor's last dim holds [a, b] and must be even, "
                         f"got shape {tuple(ab.shape)}")
    return ab.shape[-1] // 2


def rotary_output(x):
    """An empty tensor of x's logical shape [b, s, h, d] laid out as contiguous [b, h, s, d], so
    ``out.transpose(1, 2)`` is contiguous (what scaled_dot_product_attention wants)."""
    b, s, h, d = x.shape
    return torch.empty(b, h, s, d, dtype=x.dtype, device=x.device).transpose(1, 2)


def _rope(x, cos, sin, out, inverse):
    if cos.dim() == 3:  # per-row angles [b, s, d/2]: the kernels take one table, so rows are laid end to end
        b, s, h, d = x.shape
        flat_out = out.view(1, b * s, h, d) if out.stride(0) == s * out.stride(1) else torch.empty(
            1, b * s, h, d, dtype=out.dtype, device=out.device)
        _rope(x.reshape(1, b * s, h, d), cos.reshape(b * s, -1), sin.reshape(b * s, -1), flat_out, inverse)
        if flat_out.data_ptr() != out.data_ptr():
            out.copy_(flat_out.view(b, s, h, d))
        return out
    if _use_kernel(x):
        _ops.rope_apply(x, cos, sin, out, inverse)
    else:
        out.copy_(ref.rope_ref(x, cos, sin, inverse=inverse))
    return out


def rope_forward(x, cos, sin, out=None):
    """Rotates x [b, s, h, d] (any strides, stride 1 in the last dim) by the angles whose cos/sin
    (float32 [s, d/2], or [b, s, d/2] for positions that differ per row) are given. Writes into ``out`` (any strides) when given, else into a new
    tensor from :func:`rotary_output`; returns it. ``out`` must not overlap ``x``."""
    return _rope(x, cos, sin, rotary_output(x) if out is None else out, False)


def rope_backward(grad, cos, sin, out=None):
    """The backward of :func:`rope_forward` (the inverse rotation); a new contiguous [b, s, h, d]
    tensor unless ``out`` is given."""
    if out is None:
        out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
    return _rope(grad, cos, sin, out, True)


def rope_cos_sin(seq_len, head_dim, theta=10000.0, offset=0, device=None, scaling: RopeScaling | None = None):
    """``(cos, sin)``, float32 [seq_len, head_dim/2], for positions offset .. offset+seq_len-1, with
    Hugging Face LLaMA's frequencies inv_freq = 1 / theta^(arange(0, d, 2)/d), rescaled by
    LLaMA-3.1's rule (:func:`megallama.rope.scale_inv_freq`) when ``scaling`` is given."""
    if head_dim % 2:
        raise ValueError(f"rope_cos_sin: head_dim must be even, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is not None:
        inv_freq = scale_inv_freq(inv_freq, scaling)
    positions = torch.arange(offset, offset + seq_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)
    return freqs.cos(), freqs.sin()
