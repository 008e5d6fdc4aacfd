"""Learning-rate schedule: linear warmup from 0, then cosine / linear / constant decay to ``min_lr``.

The lr is a pure function of the iteration, so resuming needs no scheduler state beyond the
iteration number; the schedule's settings are stored in checkpoints, and a resume under other
settings is stopped or settled before any work (``resumed_schedule.py``).
Iteration ``i`` (1-based) uses the value Megatron's ``OptimizerParamScheduler`` gives after ``i``
steps; Megatron itself runs iteration ``i`` with step ``i - 1`` and so spends its first iteration
at lr 0. A param group with its own ``max_lr``/``min_lr`` (``--decoupled-lr``) gets the same shape
between those.
"""
from __future__ import annotations

import math
from typing import Optional

from megallama.training.config import LRScheduleArgs


class LRSchedule:
    """``args`` shape the schedule; ``peak_lr`` is the optimizer's ``lr`` (``--lr``).

    As Megatron, the schedule runs on consumed samples (``global_batch_size`` per iteration), so a
    run trained by samples (``--lr-warmup-samples``, ``--lr-decay-samples``, ``--lr-warmup-fraction``)
    gets Megatron's lr at every iteration; for lengths in iterations the ratios are the same
    integers' and so the same floats as counting in iterations.
    """

    def __init__(self, args: LRScheduleArgs, peak_lr: float, global_batch_size: int = 1):
        if args.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown --lr-decay-style {args.lr_decay_style!r}")
        self.args = args
        self.peak_lr = peak_lr
        self.global_batch_size = global_batch_size
        self.warmup_samples, self.decay_samples = args.warmup_and_decay_samples(global_batch_size)

    def lr(self, iteration: int) -> float:
        """Learning rate of the optimizer step that ends ``iteration`` (1-based) of a constant batch size."""
        return self.lr_at(iteration * self.global_batch_size)

    def lr_at(self, samples: int, peak: Optional[float] = None, floor: Optional[float] = None) -> float:
        """Learning rate of the optimizer step after which ``samples`` samples are consumed (Megatron's
        scheduler steps by each iteration's global batch size, a growing one under ``--rampup-batch-size``),
        for the schedule's peak and floor or, as a param group of Megatron's, the given ones."""
        a = self.args
        peak = self.peak_lr if peak is None else peak
        floor = a.min_lr if floor is None else floor
        warmup, decay = self.warmup_samples, self.decay_samples
        if warmup > 0 and samples <= warmup:
            return peak * samples / warmup
        if a.lr_decay_style == "constant":
            return peak
        if samples > decay:
            return floor
        progress = (samples - warmup) / (decay - warmup)
        if a.lr_decay_style == "cosine":
            coefficient = 0.5 * (math.cos(math.pi * progress) + 1.0)
        else:
            coefficient = 1.0 - progress
        return floor + coefficient * (peak - floor)

    def apply(self, optimizer, samples: int) -> float:
        """Set each param group's lr for the step after which ``samples`` samples are consumed, with the
        group's own ``max_lr``/``min_lr`` where it has them (``--decoupled-lr``), as Megatron's
        ``OptimizerParamScheduler.get_lr``; returns the schedule's own lr (the other groups')."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr_at(samples, group.get("max_lr"), group.get("min_lr"))
        return self.lr_at(samples)

    def state_dict(self) -> dict:
        """The settings, as checkpoints have always stored them (the peak as ``lr``)."""
        return {"lr": self.peak_lr, **vars(self.args)}
