"""--rampup-batch-size in real runs: the growing global batches train as a plain torch loop over the
same samples with megatron-core's lr scheduler, a data-parallel layout equals the serial run, and a
run stopped on the ramp resumes on it."""
import re
import warnings

import pytest
import torch

from megallama.data.gpt_dataset import MockGPTDataset
from megallama.model import LlamaModel
from megallama.pretrain import main
from megallama.training.arguments import parse_args
from tests.training.test_pretrain_cli import assert_curve, losses_of, torchrun

pytestmark = pytest.mark.usefixtures("one_thread")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core warns that Transformer Engine and Apex are absent
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

# Global batches 4, 4, 8, 12, 12, ... (4 → 12 in steps of 4 over 16 samples), 13 iterations in all.
RAMP = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--untie-embeddings-and-output-weights", "--seq-length", "16", "--vocab-size", "64", "--lr", "1e-3",
        "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "12", "--rampup-batch-size", "4", "4", "16",
        "--train-samples", "140", "--lr-warmup-samples", "8", "--lr-decay-samples", "140", "--log-interval", "1",
        "--eval-iters", "0"]
CONSUMED = re.compile(r"iteration\s+(\d+)/(\d+) \| consumed samples (\d+)")
SIZES = [4, 4, 8] + [12] * 10


class _SchedulerOptimizer:  # the part of a Megatron optimizer the scheduler touches
    def __init__(self):
        self.param_groups = [{"params": []}]


def plain_loop_losses(flags) -> list:
    """The reference: a plain torch loop (AdamW, clip_grad_norm_, token-mean loss) over samples
    [consumed, consumed + size) of each ramp size, lr from megatron-core's scheduler stepped in samples."""
    config = parse_args(flags, env={})
    t, o, s = config.training, config.optimizer, config.lr_schedule
    model = LlamaModel(config.model)
    model.initialize_layout_free(t.seed)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2]},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps,
                                  weight_decay=o.weight_decay)
    scheduler = OptimizerParamScheduler(
        _SchedulerOptimizer(), init_lr=0.0, max_lr=o.lr, min_lr=s.min_lr, lr_warmup_steps=s.lr_warmup_samples,
        lr_decay_steps=s.lr_decay_samples, lr_decay_style=s.lr_decay_style, start_wd=0.1, end_wd=0.1,
        wd_incr_steps=s.lr_decay_samples, wd_incr_style="constant")
    data = MockGPTDataset(t.seq_length, config.model.vocab_size, 10 ** 4, seed=t.seed)
    consumed, losses = 0, []
    for size in SIZES:
        samples = [data[i] for i in range(consumed, consumed + size)]
        tokens = torch.stack([torch.as_tensor(x["tokens"]) for x in samples])
        labels = torch.stack([torch.as_tensor(x["labels"]) for x in samples])
        loss = model(tokens, labels=labels).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.clip_grad)
        consumed += size
        scheduler.num_steps = consumed  # megallama's iteration k uses the lr after k steps (lr_schedule.py)
        for group in optimizer.param_groups:
            group["lr"] = scheduler.get_lr(scheduler.optimizer.param_groups[0])
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_ramp_trains_as_a_plain_loop_and_logs_its_batches(capsys):
    assert main(RAMP) == 0
    out = capsys.readouterr().out
    logged = [(int(i), int(n), int(c)) for i, n, c in CONSUMED.findall(out)]
    assert logged == [(k + 1, len(SIZES), sum(SIZES[:k + 1])) for k in range(len(SIZES))]
    got = losses_of(out)
    expected = dict(enumerate(plain_loop_losses(RAMP), start=1))
    assert_curve(got, expected, range(1, len(SIZES) + 1))


def test_data_parallel_ramp_equals_serial_and_resumes_on_the_ramp(capsys, tmp_path):
    assert main(RAMP) == 0
    serial = losses_of(capsys.readouterr().out)
    run = torchrun(*RAMP, "--save", str(tmp_path), "--exit-interval", "3", nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_curve(losses_of(run.stdout), serial, range(1, 4))
    # Stopped after 3 iterations, 16 samples: the ramp's last sample count, where the next batch is 12.
    assert main([*RAMP, "--load", str(tmp_path)]) == 0
    assert_curve(losses_of(capsys.readouterr().out), serial, range(4, len(SIZES) + 1))
