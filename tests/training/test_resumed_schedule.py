"""A resume must not silently change the lr schedule (Megatron's ``OptimizerParamScheduler`` rules).

A run interrupted at iteration 4 of 8 and resumed with another schedule stops before any work
with one line naming each difference; ``--use-checkpoint-opt_param-scheduler`` then continues the
checkpoint's schedule exactly, ``--override-opt_param-scheduler`` runs the flags'. Resuming with
the same flags stays bit-identical, and a checkpoint that records no schedule resumes on the flags'.
A ``--finetune`` starts a new schedule from ``--load``, but its relaunch from ``--save`` is checked.
"""
import json
import os
import re
import shutil

import pytest

from megallama.checkpoint import storage as ckpt
from megallama.pretrain import main
from megallama.training.arguments import ConfigError, parse_args
from megallama.training.config import LRScheduleArgs
from megallama.training.lr_schedule import LRSchedule

ITERS = 8
# No --lr-decay-iters: it defaults to --train-iters, the change that reshaped resumed schedules silently.
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--untie-embeddings-and-output-weights", "--seq-length", "16", "--vocab-size", "64", "--lr", "1e-3",
        "--lr-warmup-iters", "2", "--mock-data", "--global-batch-size", "8", "--micro-batch-size", "2",
        "--log-interval", "1", "--eval-iters", "0"]
LINE = re.compile(r"iteration\s+(\d+)/\d+ \|.*? lm loss (\S+) \| learning rate (\S+) ")


def curve(text: str) -> dict:
    """{iteration: (loss, lr)} of the log lines."""
    return {int(i): (float(loss), float(lr)) for i, loss, lr in LINE.findall(text)}


def run(capsys, *flags) -> dict:
    assert main([*TINY, *flags]) == 0, capsys.readouterr().err
    return curve(capsys.readouterr().out)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """An uninterrupted run of 8 iterations, and the same run stopped (and saved) after iteration 4."""
    import io
    from contextlib import redirect_stdout

    stopped = str(tmp_path_factory.mktemp("stopped"))
    out = io.StringIO()
    with redirect_stdout(out):
        assert main([*TINY, "--train-iters", str(ITERS)]) == 0
        full = curve(out.getvalue())
        assert main([*TINY, "--train-iters", str(ITERS), "--save", stopped, "--exit-interval", "4"]) == 0
    assert ckpt.read_tracker(stopped) == 4
    return {"curve": full, "checkpoint": stopped}


def test_resuming_with_the_same_flags_is_bit_identical(interrupted, capsys, tmp_path):
    resumed = run(capsys, "--train-iters", str(ITERS), "--load", interrupted["checkpoint"], "--save", str(tmp_path))
    assert resumed == {i: interrupted["curve"][i] for i in range(5, ITERS + 1)}


def test_another_schedule_is_a_one_line_error_before_any_work(interrupted, capsys):
    load = interrupted["checkpoint"]
    assert main([*TINY, "--train-iters", "6", "--load", load]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # not even the memory estimate: no process group, data or model was made
    assert err == (f"megallama.pretrain: error: --load {load} (iteration 4) was trained with another lr schedule: "
                   "--lr-decay-iters 8 there, 6 here (its default is --train-iters); give "
                   "--use-checkpoint-opt_param-scheduler to keep the checkpoint's schedule or "
                   "--override-opt_param-scheduler to use the flags'\n")


def test_the_error_names_every_differing_setting_with_both_values(interrupted):
    flags = [f for f in TINY if f not in ("--lr", "1e-3")]
    with pytest.raises(ConfigError) as error:
        parse_args([*flags, "--train-iters", str(ITERS), "--load", interrupted["checkpoint"], "--lr", "2e-3",
                    "--min-lr", "0", "--lr-warmup-iters", "3", "--lr-decay-style", "linear", "--weight-decay", "0.05",
                    "--decoupled-lr", "5e-3"], env={})
    message = str(error.value)
    assert "\n" not in message
    for part in ("--lr 0.001 there, 0.002 here", "--min-lr 0.0001 there, 0 here", "--lr-warmup-iters 2 there, 3 here",
                 "--lr-decay-style cosine there, linear here", "--decoupled-lr unset there, 0.005 here",
                 "--weight-decay 0.1 there, 0.05 here"):
        assert part in message
    assert "--lr-decay-iters" not in message and "--decoupled-min-lr" not in message  # unchanged (floor: --min-lr)
    # The same schedule spelt out: the embedding's group at --lr and --min-lr is what it ran without the flags.
    parse_args([*TINY, "--train-iters", str(ITERS), "--load", interrupted["checkpoint"], "--decoupled-lr", "1e-3",
                "--decoupled-min-lr", "1e-4"], env={})


def test_use_checkpoint_schedule_continues_the_uninterrupted_run(interrupted, capsys):
    # Even a new --lr is overruled: the checkpoint's peak, floor, warmup and decay length run on.
    flags = [f for f in TINY if f not in ("--lr", "1e-3")]
    assert main([*flags, "--lr", "5e-3", "--train-iters", "6", "--load", interrupted["checkpoint"],
                 "--use-checkpoint-opt_param-scheduler"]) == 0
    resumed = curve(capsys.readouterr().out)
    assert resumed == {i: interrupted["curve"][i] for i in (5, 6)}  # lr and loss, bit for bit


def test_use_checkpoint_schedule_keeps_its_length_in_samples_under_another_batch_size(interrupted):
    c = parse_args([*TINY, "--global-batch-size", "16", "--train-iters", str(ITERS), "--load",
                    interrupted["checkpoint"], "--use-checkpoint-opt_param-scheduler"], env={})
    assert c.lr_schedule.warmup_and_decay_samples(16) == (2 * 8, ITERS * 8)  # the checkpoint's, at batch 8


def test_override_runs_the_flags_schedule(interrupted, capsys):
    resumed = run(capsys, "--train-iters", "6", "--load", interrupted["checkpoint"], "--override-opt_param-scheduler")
    flags = LRSchedule(LRScheduleArgs(min_lr=1e-4, lr_warmup_iters=2, lr_decay_iters=6), 1e-3, 8)
    assert [resumed[i][1] for i in (5, 6)] == pytest.approx([flags.lr(5), flags.lr(6)], rel=1e-6)
    assert resumed[6][1] != pytest.approx(interrupted["curve"][6][1], rel=1e-3)


def test_the_two_flags_exclude_each_other(interrupted):
    with pytest.raises(ConfigError, match="^argument --use-checkpoint-opt_param-scheduler: not allowed with "
                       "argument --override-opt_param-scheduler"):
        parse_args([*TINY, "--train-iters", "6", "--override-opt_param-scheduler",
                    "--use-checkpoint-opt_param-scheduler"], env={})


def test_no_load_optim_and_finetune_start_their_own_schedule(interrupted, capsys, tmp_path):
    # As Megatron: --no-load-optim loads no scheduler state, so there is nothing to compare.
    parse_args([*TINY, "--train-iters", "6", "--load", interrupted["checkpoint"], "--no-load-optim"], env={})
    finetuned = run(capsys, "--train-iters", "3", "--finetune", "--load", interrupted["checkpoint"],
                    "--save", str(tmp_path))
    flags = LRSchedule(LRScheduleArgs(min_lr=1e-4, lr_warmup_iters=2, lr_decay_iters=3), 1e-3, 8)
    assert [finetuned[i][1] for i in (1, 2, 3)] == pytest.approx([flags.lr(i) for i in (1, 2, 3)], rel=1e-6)


def test_a_relaunched_finetune_is_checked_against_its_own_save(interrupted, capsys, tmp_path):
    # Its first start above (from --load) is a new schedule; a relaunch resumes --save, as any resume.
    save = str(tmp_path)
    finetune = [*TINY, "--finetune", "--load", interrupted["checkpoint"], "--save", save]
    assert main([*finetune, "--train-iters", "4", "--exit-interval", "2"]) == 0
    capsys.readouterr()
    assert main([*finetune, "--train-iters", "6"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"megallama.pretrain: error: --save {save} (iteration 2) was trained with another lr "
                          "schedule: --lr-decay-iters 4 there, 6 here (its default is --train-iters); give ")
    c = parse_args([*finetune, "--train-iters", "6", "--use-checkpoint-opt_param-scheduler"], env={})
    assert c.lr_schedule.warmup_and_decay_samples(8) == (2 * 8, 4 * 8)  # the checkpoint's
    c = parse_args([*finetune, "--train-iters", "6", "--override-opt_param-scheduler"], env={})
    assert c.lr_schedule.warmup_and_decay_samples(8) == (2 * 8, 6 * 8)  # the flags'


def test_a_checkpoint_that_records_no_schedule_resumes_on_the_flags(interrupted, capsys, tmp_path):
    # As one converted from HF or Meta weights (native._imported_run_config records no schedule).
    old = shutil.copytree(interrupted["checkpoint"], tmp_path / "old")
    path = os.path.join(ckpt.checkpoint_dir(str(old), 4), ckpt.METADATA_FILENAME)
    with open(path) as f:
        document = json.load(f)
    common = document["common"]
    del common["lr_schedule"], common["config"]["lr_schedule"], common["config"]["optimizer"]
    with open(path, "w") as f:
        json.dump(document, f)
    resumed = run(capsys, "--train-iters", "6", "--load", str(old))
    flags = LRSchedule(LRScheduleArgs(min_lr=1e-4, lr_warmup_iters=2, lr_decay_iters=6), 1e-3, 8)
    assert [resumed[i][1] for i in (5, 6)] == pytest.approx([flags.lr(5), flags.lr(6)], rel=1e-6)
