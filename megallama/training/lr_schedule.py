"""Learning-rate schedule: linear warmup from 0, then cosine / linear / constant decay to ``min_lr``.

The lr is a pure function of the iteration, so resuming needs no scheduler state beyond the
iteration number (the schedule's settings are still stored in checkpoints, for the record).
Iteration ``i`` (1-based) uses the value Megatron's ``OptimizerParamScheduler`` gives after ``i``
steps; Megatron itself runs iteration ``i`` with step ``i - 1`` and so spends its first iteration
at lr 0.
"""
from __future__ import annotations

import math

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
        """Learning rate of the optimizer step that ends ``iteration`` (1-based)."""
        a, peak = self.args, self.peak_lr
        samples, warmup, decay = iteration * self.global_batch_size, self.warmup_samples, self.decay_samples
        if warmup > 0 and samples <= warmup:
            return peak * samples / warmup
        if a.lr_decay_style == "constant":
            return peak
        if samples > decay:
            return a.min_lr
        progress = (samples - warmup) / (decay - warmup)
        if a.lr_decay_style == "cosine":
            coefficient = 0.5 * (math.cos(math.pi * progress) + 1.0)
        else:
            coefficient = 1.0 - progress
        return a.min_lr + coefficient * (peak - a.min_lr)

    def apply(self, optimizer, iteration: int) -> float:
        """Set every param group's lr for ``iteration``; returns it."""
        lr = self.lr(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        """The settings, as checkpoints have always stored them (the peak as ``lr``)."""
        return {"lr": self.peak_lr, **vars(self.args)}
