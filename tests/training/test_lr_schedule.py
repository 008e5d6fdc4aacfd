"""The lr schedule equals Megatron-core's OptimizerParamScheduler after the same number of steps."""
import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megallama.training.config import LRScheduleArgs
from megallama.training.lr_schedule import LRSchedule


class _Optimizer:  # the only part of MegatronOptimizer the scheduler touches
    def __init__(self):
        self.param_groups = [{"params": []}]


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_matches_megatron_core(style, warmup):
    args = LRScheduleArgs(min_lr=3e-5, lr_decay_style=style, lr_warmup_iters=warmup, lr_decay_iters=40)
    ours = LRSchedule(args, peak_lr=3e-4)
    reference = OptimizerParamScheduler(
        _Optimizer(), init_lr=0.0, max_lr=3e-4, min_lr=args.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=args.lr_decay_iters, lr_decay_style=style, start_wd=0.1, end_wd=0.1,
        wd_incr_steps=40, wd_incr_style="constant",
    )
    for iteration in range(1, 51):
        reference.num_steps = iteration
        assert ours.lr(iteration) == pytest.approx(reference.get_lr(reference.optimizer.param_groups[0]), rel=1e-12)


def test_paper_shape_and_apply():
    s = LRSchedule(LRScheduleArgs(min_lr=0.1, lr_warmup_iters=2000, lr_decay_iters=10000), peak_lr=1.0)
    assert s.lr(1) == 1 / 2000 and s.lr(2000) == 1.0 and s.lr(10000) == pytest.approx(0.1)
    assert s.lr(20000) == 0.1 and s.lr(6000) == pytest.approx(0.55)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))])
    assert s.apply(opt, 1000) == 0.5 and opt.param_groups[0]["lr"] == 0.5
    assert s.state_dict() == {"lr": 1.0, "min_lr": 0.1, "lr_decay_style": "cosine", "lr_warmup_iters": 2000,
                              "lr_decay_iters": 10000, "lr_warmup_samples": None, "lr_decay_samples": None,
                              "lr_warmup_fraction": None}


@pytest.mark.parametrize("style", ["cosine", "linear"])
@pytest.mark.parametrize("lengths", [
    dict(lr_warmup_samples=100, lr_decay_samples=1000),  # by samples, not multiples of the batch
    dict(lr_warmup_samples=0, lr_decay_samples=1000, lr_warmup_fraction=0.05),
    dict(lr_decay_iters=40, lr_warmup_iters=0, lr_warmup_fraction=0.001 * 43),  # GPT-3's style, by iterations
])
def test_samples_and_warmup_fraction_match_megatron_core(style, lengths):
    # Megatron steps its scheduler by the global batch size every iteration and counts lengths in samples.
    global_batch = 24
    args = LRScheduleArgs(min_lr=3e-5, lr_decay_style=style, **lengths)
    ours = LRSchedule(args, peak_lr=3e-4, global_batch_size=global_batch)
    decay = args.lr_decay_samples if args.lr_decay_samples is not None else args.lr_decay_iters * global_batch
    warmup = args.lr_warmup_fraction * decay if args.lr_warmup_fraction is not None else args.lr_warmup_samples
    reference = OptimizerParamScheduler(
        _Optimizer(), init_lr=0.0, max_lr=3e-4, min_lr=args.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=decay, lr_decay_style=style, start_wd=0.1, end_wd=0.1, wd_incr_steps=decay,
        wd_incr_style="constant",
    )
    for iteration in range(1, 50):
        reference.num_steps = iteration * global_batch
        assert ours.lr(iteration) == pytest.approx(reference.get_lr(reference.optimizer.param_groups[0]), rel=1e-12)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_each_group_follows_megatron_core_with_its_own_max_and_min_lr(style, warmup):
    # --decoupled-lr's groups carry max_lr (and min_lr with --decoupled-min-lr); a group without them
    # takes the scheduler's, in Megatron's get_lr as in apply.
    groups = [{}, {"max_lr": 5e-4}, {"max_lr": 5e-4, "min_lr": 4.5e-5}, {"max_lr": 0.0, "min_lr": 0.0}]
    args = LRScheduleArgs(min_lr=3e-5, lr_decay_style=style, lr_warmup_iters=warmup, lr_decay_iters=40)
    ours = LRSchedule(args, peak_lr=3e-4, global_batch_size=4)
    optimizer = _Optimizer()
    optimizer.param_groups = [dict(g, params=[]) for g in groups]
    reference = OptimizerParamScheduler(
        _Optimizer(), init_lr=0.0, max_lr=3e-4, min_lr=args.min_lr, lr_warmup_steps=warmup * 4,
        lr_decay_steps=40 * 4, lr_decay_style=style, start_wd=0.1, end_wd=0.1, wd_incr_steps=160,
        wd_incr_style="constant",
    )
    for iteration in range(0, 51):
        reference.num_steps = iteration * 4
        assert ours.apply(optimizer, iteration * 4) == ours.lr(iteration)  # the default groups' lr, for the log
        assert [g["lr"] for g in optimizer.param_groups] == [reference.get_lr(g) for g in groups]
