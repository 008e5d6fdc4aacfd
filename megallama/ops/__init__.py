"""Fused ops of megallama (RMSNorm, SwiGLU, rotary embedding, cross-entropy unit gradient, whole or
in two phases for vocabulary-parallel logits, weight-gradient accumulation): autograd Functions,
the functional API, the raw kernel callers for hand-written backwards, and the plain-torch
reference forms.

Importing this package loads the compiled extension ``megallama._ops`` and fails with an
ImportError telling how to build it when it is missing.
"""
from megallama.ops.functions import (
    RMSNormFunction,
    RotaryFunction,
    SwiGLUPackedFunction,
    apply_rotary,
    rms_norm,
    swiglu_packed,
)
from megallama.ops.kernels import (
    cross_entropy_grad_from_stats_,
    cross_entropy_partials,
    cross_entropy_unit_grad_,
    has_cuda,
    has_fp32_wgrad_gemm,
    rms_norm_backward,
    rms_norm_forward,
    rope_backward,
    rope_cos_sin,
    rope_forward,
    rotary_output,
    swiglu_backward,
    swiglu_forward,
    wgrad_accumulate_,
)
from megallama.ops.reference import (
    cross_entropy_grad_from_stats_ref_,
    cross_entropy_partials_ref,
    cross_entropy_unit_grad_ref,
    rms_norm_ref,
    rope_ref,
    swiglu_ref,
    wgrad_accumulate_ref,
)

__all__ = [
    "RMSNormFunction", "RotaryFunction", "SwiGLUPackedFunction",
    "apply_rotary", "rms_norm", "swiglu_packed",
    "cross_entropy_grad_from_stats_", "cross_entropy_partials", "cross_entropy_unit_grad_", "has_cuda",
    "has_fp32_wgrad_gemm", "rms_norm_backward", "rms_norm_forward", "rope_backward", "rope_cos_sin",
    "rope_forward", "rotary_output", "swiglu_backward", "swiglu_forward", "wgrad_accumulate_",
    "cross_entropy_grad_from_stats_ref_", "cross_entropy_partials_ref", "cross_entropy_unit_grad_ref",
    "rms_norm_ref", "rope_ref", "swiglu_ref", "wgrad_accumulate_ref",
]
