"""Fused ops of megallama (RMSNorm, SwiGLU, rotary embedding): autograd Functions, the functional
API, the raw kernel callers for hand-written backwards, and the plain-torch reference forms.

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
    has_cuda,
    rms_norm_backward,
    rms_norm_forward,
    rope_backward,
    rope_cos_sin,
    rope_forward,
    rotary_output,
    swiglu_backward,
    swiglu_forward,
)
from megallama.ops.reference import rms_norm_ref, rope_ref, swiglu_ref

__all__ = [
    "RMSNormFunction", "RotaryFunction", "SwiGLUPackedFunction",
    "apply_rotary", "rms_norm", "swiglu_packed",
    "has_cuda", "rms_norm_backward", "rms_norm_forward", "rope_backward", "rope_cos_sin",
    "rope_forward", "rotary_output", "swiglu_backward", "swiglu_forward",
    "rms_norm_ref", "rope_ref", "swiglu_ref",
]
