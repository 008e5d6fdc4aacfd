"""A resumed run's learning-rate schedule against the one its checkpoint was trained with.

The lr is a function of the consumed samples and the schedule's settings, so a resume under other
settings (a shorter ``--train-iters``, from which ``--lr-decay-iters`` defaults) would reshape the
rest of the schedule without a word. As Megatron's ``OptimizerParamScheduler.load_state_dict``,
every setting recorded in the checkpoint is compared with the flags' before any work:
``--override-opt_param-scheduler`` keeps the flags', ``--use-checkpoint-opt_param-scheduler`` takes
the checkpoint's, and with neither a difference is an error. Lengths compare in samples, as
Megatron's scheduler counts them (the same ``--lr-decay-iters`` under another global batch size is
another schedule). Megatron also compares its weight-decay increment; megallama's weight decay is
constant (``--weight-decay``), so that value is what is compared. A ``--finetune`` run's first start
(from ``--load``) is a new schedule and unchecked; its relaunch (from its own ``--save``) is a resume.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from megallama.training.arguments_model import ConfigError
from megallama.training.config import LRScheduleArgs, PretrainConfig

# The stored run-config fields that must all be there for the schedule to count as recorded: a
# checkpoint converted from HF or Meta weights records none of them, and its resume keeps the flags'.
_RECORDED = {"lr_schedule": ("min_lr", "lr_decay_style", "lr_warmup_iters", "lr_decay_iters"),
             "optimizer": ("weight_decay",), "training": ("global_batch_size",)}


def recorded_schedule(stored: dict) -> Optional[PretrainConfig]:
    """The checkpoint's stored run config (``common["config"]``) when it records the schedule's
    settings, else None. The peak lr lives in "optimizer" since version 2 of that dict, in
    "lr_schedule" before."""
    for group, names in _RECORDED.items():
        if not all(name in (stored.get(group) or {}) for name in names):
            return None
    if "lr" not in stored["optimizer"] and "lr" not in stored["lr_schedule"]:
        return None
    return PretrainConfig.from_dict(stored)


def _warmup_flag(s: LRScheduleArgs) -> tuple[str, float]:
    if s.lr_warmup_fraction is not None:
        return "--lr-warmup-fraction", s.lr_warmup_fraction
    if s.lr_warmup_samples is not None:
        return "--lr-warmup-samples", s.lr_warmup_samples
    return "--lr-warmup-iters", s.lr_warmup_iters


def _decay_flag(s: LRScheduleArgs) -> tuple[str, float]:
    if s.lr_decay_samples is not None:
        return "--lr-decay-samples", s.lr_decay_samples
    return "--lr-decay-iters", s.lr_decay_iters


def _settings(config: PretrainConfig) -> dict[str, tuple[str, object, object]]:
    """Each compared setting: (flag, value as given, value compared)."""
    s, o = config.lr_schedule, config.optimizer
    warmup, decay = s.warmup_and_decay_samples(config.training.global_batch_size)
    # The embedding's and output layer's group as it runs: --lr and --min-lr without --decoupled-lr,
    # --min-lr as the floor without --decoupled-min-lr (megatron-core's _get_param_groups).
    decoupled = o.decoupled_lr is not None
    peak = o.decoupled_lr if decoupled else o.lr
    floor = o.decoupled_min_lr if decoupled and o.decoupled_min_lr is not None else s.min_lr
    return {"lr": ("--lr", o.lr, o.lr), "min_lr": ("--min-lr", s.min_lr, s.min_lr),
            "warmup": (*_warmup_flag(s), warmup), "decay": (*_decay_flag(s), decay),
            "style": ("--lr-decay-style", s.lr_decay_style, s.lr_decay_style),
            "decoupled_lr": ("--decoupled-lr", o.decoupled_lr, peak),
            "decoupled_min_lr": ("--decoupled-min-lr", o.decoupled_min_lr, floor),
            "weight_decay": ("--weight-decay", o.weight_decay, o.weight_decay)}


def _shown(a, b) -> tuple[str, str]:
    """Short forms of two values, unless that makes them look equal."""
    short = tuple(f"{v:g}" if isinstance(v, float) else "unset" if v is None else str(v) for v in (a, b))
    return short if short[0] != short[1] else (str(a), str(b))


def schedule_differences(stored: PretrainConfig, ours: PretrainConfig) -> list[str]:
    """``FLAG THEIRS there, OURS here`` for each schedule setting that differs (in samples, for the lengths)."""
    theirs, mine = _settings(stored), _settings(ours)
    out = []
    for key, (flag, given, compared) in theirs.items():
        our_flag, our_given, our_compared = mine[key]
        # Both unset: the group follows --lr and --min-lr, whose differences are named already.
        if compared == our_compared or (given is None and our_given is None):
            continue
        a, b = _shown(given, our_given)
        if flag != our_flag:
            text = f"{flag} {a} there, {our_flag} {b} here"
        elif a == b:  # the same value given, another one run
            if key not in ("warmup", "decay") or stored.training.global_batch_size == ours.training.global_batch_size:
                continue  # it follows from a difference named already (the decay length, --decoupled-lr)
            text = (f"{flag} {a} there with --global-batch-size {stored.training.global_batch_size}, here with "
                    f"{ours.training.global_batch_size}")
        else:
            text = f"{flag} {a} there, {b} here"
        if key == "decay" and our_flag == "--lr-decay-iters":
            text += " (its default is --train-iters)"
        out.append(text)
    return out


def use_checkpoint_schedule(stored: PretrainConfig, config: PretrainConfig) -> None:
    """Give ``config`` the checkpoint's schedule. Its lengths are kept in samples (what the schedule
    runs on), so they stay the checkpoint's under another global batch size too."""
    s = stored.lr_schedule
    warmup, decay = s.warmup_and_decay_samples(stored.training.global_batch_size)
    config.lr_schedule = dataclasses.replace(
        s, lr_decay_samples=decay, lr_warmup_samples=None if s.lr_warmup_fraction is not None else warmup)
    config.optimizer = dataclasses.replace(config.optimizer, lr=stored.optimizer.lr,
                                           decoupled_lr=stored.optimizer.decoupled_lr,
                                           decoupled_min_lr=stored.optimizer.decoupled_min_lr,
                                           weight_decay=stored.optimizer.weight_decay)


def check_resumed_schedule(stored_config: dict, config: PretrainConfig, where: str) -> None:
    """Compare the schedule recorded in ``stored_config`` (a checkpoint's run config) with ``config``'s;
    raise ``ConfigError`` naming each difference, or settle it as the flags say. ``where`` names the
    checkpoint in the message. Nothing recorded (a converted checkpoint) or ``--no-load-optim`` (which,
    as in Megatron, loads no scheduler state either): the flags' schedule, unchecked."""
    ck = config.checkpoint
    stored = recorded_schedule(stored_config)
    if stored is None or ck.no_load_optim or ck.override_opt_param_scheduler:
        return
    differences = schedule_differences(stored, config)
    if not differences:
        return
    if ck.use_checkpoint_opt_param_scheduler:
        use_checkpoint_schedule(stored, config)
        return
    raise ConfigError(f"{where} was trained with another lr schedule: {'; '.join(differences)}; give "
                      "--use-checkpoint-opt_param-scheduler to keep the checkpoint's schedule or "
                      "--override-opt_param-scheduler to use the flags'")
