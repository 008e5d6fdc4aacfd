"""The accelerators the planner knows: compute peak, memory, and the bandwidths between them.

Peak dense bf16 FLOP/s comes from ``megallama.training.flops.PEAK_TFLOPS`` (the table the trainer's
MFU uses), so the two never disagree. The other columns are the vendors' datasheet figures for
the SXM parts in an 8-GPU HGX/DGX node:

* ``hbm_gb_s``: device memory bandwidth;
* ``nvlink_gb_s``: NVLink bandwidth per GPU and direction (A100 600 GB/s bidirectional → 300;
  H100/H200 900 → 450), what a ring collective inside a node moves data at;
* ``network_gb_s``: the inter-node network per GPU and direction (one 200 Gb/s HDR InfiniBand
  NIC per A100, one 400 Gb/s NDR per H100/H200: 25 and 50 GB/s).

Every field can be overridden from the command line (``tools/plan.py --gpu-memory-gb ...``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megallama.training.flops import PEAK_TFLOPS


@dataclass(frozen=True)
class GpuSpec:
    name: str
    bf16_tflops: float
    memory_gb: float          # device memory, 1e9 bytes
    hbm_gb_s: float
    nvlink_gb_s: float
    network_gb_s: float
    gpus_per_node: int = 8

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


def _peak(key: str) -> float:
    return dict(PEAK_TFLOPS)[key]["bf16"]


# name → (PEAK_TFLOPS key, memory GB, HBM GB/s, NVLink GB/s, network GB/s)
_DATASHEETS = {
    "a100-40gb": ("A100", 40, 1555, 300, 25),
    "a100-80gb": ("A100", 80, 2039, 300, 25),
    "h100-80gb": ("H100", 80, 3350, 450, 50),
    "h200-141gb": ("H200", 141, 4800, 450, 50),
    "b200-180gb": ("B200", 180, 8000, 900, 50),
}

GPUS = {name: GpuSpec(name, _peak(key), mem, hbm, nvlink, net)
        for name, (key, mem, hbm, nvlink, net) in _DATASHEETS.items()}


def gpu_spec(name: str, **overrides) -> GpuSpec:
    """The named GPU with any field replaced (``None`` values are ignored)."""
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)} (and override its "
                         "figures with the --gpu-* flags for another part)")
    changes = {k: v for k, v in overrides.items() if v is not None}
    for key, value in changes.items():
        if key != "name" and not value > 0:
            raise ValueError(f"GPU {key} must be positive, got {value}")
    return dataclasses.replace(GPUS[name], **changes)
