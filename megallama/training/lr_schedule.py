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
    def __init__(self, args: LRScheduleArgs):
        if args.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown --lr-decay-style {args.lr_decay_style!r}")
        self.args = args

    def lr(self, iteration: int) -> float:
        """Learning rate of the optimizer step that ends ``iteration`` (1-based)."""
        a = self.args
        if a.lr_warmup_iters > 0 and iteration <= a.lr_warmup_iters:
            return a.lr * iteration / a.lr_warmup_iters
        if a.lr_decay_style == "constant":
            return a.lr
        if iteration > a.lr_decay_iters:
            return a.min_lr
        progress = (iteration - a.lr_warmup_iters) / (a.lr_decay_iters - a.lr_warmup_iters)
        if a.lr_decay_style == "cosine":
            coefficient = 0.5 * (math.cos(math.pi * progress) + 1.0)
        else:
            coefficient = 1.0 - progress
        return a.min_lr + coefficient * (a.lr - a.min_lr)

    def apply(self, optimizer, iteration: int) -> float:
        """Set every param group's lr for ``iteration``; returns it."""
        lr = self.lr(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return dict(vars(self.args))
