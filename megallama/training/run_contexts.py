"""Contexts the training loop runs in, from run-time flags: ``--attention-backend``'s attention
kernels and ``--manual-gc``'s garbage collection."""
from __future__ import annotations

import contextlib
import gc

from torch.nn.attention import SDPBackend, sdpa_kernel

# --attention-backend → the kernels torch's scaled_dot_product_attention may choose from (auto: all).
SDPA_BACKENDS = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "fused": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION],
    "unfused": [SDPBackend.MATH],
    "local": [SDPBackend.MATH],
}


def attention_kernels(backend: str):
    """The context that restricts attention to ``--attention-backend``'s kernels."""
    return sdpa_kernel(SDPA_BACKENDS[backend]) if backend in SDPA_BACKENDS else contextlib.nullcontext()


@contextlib.contextmanager
def manual_garbage_collection(enabled: bool):
    """``--manual-gc``: Python's automatic collector off for the run (the loop collects at fixed
    iterations instead), on again afterwards."""
    if not enabled or not gc.isenabled():
        yield
        return
    gc.disable()
    gc.collect()
    try:
        yield
    finally:
        gc.enable()
