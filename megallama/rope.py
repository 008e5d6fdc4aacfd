"""LLaMA-3.1's rotary-frequency scaling: its parameters and the rule that applies them.

The rule (Meta's ``apply_scaling``, HF's ``rope_type="llama3"``): a frequency whose wavelength is
shorter than ``original_max_position_embeddings / high_freq_factor`` is kept; one longer than
``original_max_position_embeddings / low_freq_factor`` is divided by ``factor``; in between, the
two are blended by how many turns the wavelength makes in the original context.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1's defaults (Meta's code hard-codes them; LLaMA-3.2 1B/3B use ``factor=32``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if not self.factor >= 1:
            raise ValueError(f"RopeScaling.factor must be >= 1, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"RopeScaling needs 0 < low_freq_factor < high_freq_factor, got "
                             f"{self.low_freq_factor} and {self.high_freq_factor}")
        if self.original_max_position_embeddings <= 0:
            raise ValueError(f"RopeScaling.original_max_position_embeddings must be positive, "
                             f"got {self.original_max_position_embeddings}")


def scale_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """``inv_freq`` (radians per position, one per rotated pair) under LLaMA-3.1's scaling."""
    context = scaling.original_max_position_embeddings
    turns = context * inv_freq / (2 * math.pi)  # = context / wavelength
    # 0 at the low-frequency edge (wavelength = context / low), 1 at the high (context / high)
    smooth = ((turns - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)).clamp(0, 1)
    return (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
