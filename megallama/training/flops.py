"""Model FLOPs and MFU, counted as Megatron-LM and PaLM (Chowdhery et al. 2022, App. B) count them.

Only matrix multiplications count, 2 FLOPs per multiply-add; backward costs twice the forward (the
input and the weight gradient), so a training step is 3× the forward. Recomputation is not counted
(that would be hardware FLOPs, not model FLOPs). Per token of one sequence of length ``s``:

* each layer's projections: q and o are ``h × q`` with ``q`` = heads · head size (``h`` unless
  ``kv_channels`` says otherwise), k and v ``h × g·d`` for ``g`` key/value groups (grouped-query
  attention; ``g`` = heads without it), and the SwiGLU FFN has three ``h × f`` matrices, so
  ``2·(2hq + 2h·gd + 3hf)`` forward FLOPs — ``2·(4h² + 3hf)`` for LLaMA-1;
* each layer's attention core: scores ``QKᵀ`` and the weighted sum of ``V`` are each ``s × q``
  per token (every query head against its group's keys), ``2·2·s·q`` forward FLOPs — the full
  ``s²`` square, causal mask or not, as both count;
* the output layer: ``2·h·V``. The embedding is a lookup: no FLOPs.
"""
from __future__ import annotations

from typing import Optional

import torch

# Dense (no sparsity) peak TFLOP/s of one device by precision, from the vendors' datasheets.
# Looked up by substring of torch.cuda.get_device_name(); first match wins, so specific names first.
PEAK_TFLOPS = (
    ("GH200", {"bf16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
    ("H800", {"bf16": 989.0, "fp32": 67.0}),
    ("B200", {"bf16": 2250.0, "fp32": 80.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp32": 31.2}),
    ("V100", {"bf16": 125.0, "fp32": 15.7}),  # fp16 tensor cores: V100 has no bf16
)


def estimate_flops(
    *, num_layers: int, hidden_size: int, ffn_hidden_size: int, seq_length: int, vocab_size: int,
    num_sequences: int = 1, num_attention_heads: int = 1, num_query_groups: Optional[int] = None,
    kv_channels: Optional[int] = None,
) -> float:
    """Model FLOPs of one training step (forward + backward) over ``num_sequences`` sequences.
    ``num_query_groups`` (default: one per head) and ``kv_channels`` (default: hidden_size /
    num_attention_heads) as in :class:`megallama.config.LlamaConfig`; heads matter only with them."""
    h, f, s = hidden_size, ffn_hidden_size, seq_length
    head_size = kv_channels or h // num_attention_heads
    q = num_attention_heads * head_size
    kv = (num_query_groups or num_attention_heads) * head_size
    projections = 2 * (2 * h * q + 2 * h * kv + 3 * h * f)
    attention = 2 * 2 * s * q
    output_layer = 2 * h * vocab_size
    forward_per_token = num_layers * (projections + attention) + output_layer
    return 3.0 * forward_per_token * s * num_sequences


def detect_peak_tflops(dtype: torch.dtype, device: Optional[torch.device] = None) -> Optional[float]:
    """Datasheet peak of the current CUDA device for ``dtype``; None on CPU or an unknown GPU."""
    if device is None or device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    precision = "bf16" if dtype in (torch.bfloat16, torch.float16) else "fp32"
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return peaks[precision]
    return None


def estimate_mfu(flops: float, seconds: float, num_devices: int, peak_tflops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: achieved FLOP/s per device over the device's peak (None without a peak)."""
    if not peak_tflops or seconds <= 0:
        return None
    return tflops_per_device(flops, seconds, num_devices) / peak_tflops


def tflops_per_device(flops: float, seconds: float, num_devices: int) -> float:
    return flops / seconds / num_devices / 1e12
