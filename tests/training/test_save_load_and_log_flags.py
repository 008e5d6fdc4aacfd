"""Megatron's ``--no-save-optim``, ``--no-save-rng``, ``--exit-on-missing-checkpoint`` and
``--log-params-norm``, with Megatron's meaning."""
import re
import shutil

import pytest
import torch

from megallama.checkpoint import load_model
from megallama.checkpoint import storage as ckpt
from megallama.pretrain import main
from tests.training.test_pretrain_cli import TINY, torchrun

PARAMS_NORM = re.compile(r"iteration\s+(\d+)/\d+ \|.*? params norm (\S+) \|")


pytestmark = pytest.mark.usefixtures("one_thread")


def _metadata(root: str) -> dict:
    return ckpt.read_metadata(ckpt.checkpoint_dir(root, ckpt.read_tracker(root)))


def test_no_save_optim_saves_weights_only_and_its_resume_must_say_no_load_optim(tmp_path, capsys):
    save = str(tmp_path / "weights_only")
    assert main([*TINY, "--train-iters", "2", "--save", save, "--no-save-optim"]) == 0
    keys = set(_metadata(save)["pieces"])
    assert keys and not any(k.startswith("optimizer.") for k in keys)
    assert any(k.startswith("model.") for k in keys)
    capsys.readouterr()
    assert main([*TINY, "--train-iters", "3", "--load", save]) == 2  # would start AdamW afresh without a word
    assert capsys.readouterr().err == (
        f"megallama.pretrain: error: --load {save} (iteration 2) was saved without optimizer state "
        "(--no-save-optim): resume it with --no-load-optim (fresh AdamW moments)\n")
    assert main([*TINY, "--train-iters", "3", "--load", save, "--no-load-optim"]) == 0


def test_no_save_rng_saves_no_rng_state_and_resumes(tmp_path, capsys):
    save = str(tmp_path / "no_rng")
    assert main([*TINY, "--train-iters", "2", "--save", save, "--no-save-rng"]) == 0
    iter_dir = ckpt.checkpoint_dir(save, 2)
    assert ckpt.read_rank_state(iter_dir, 0) == {}
    capsys.readouterr()
    assert main([*TINY, "--train-iters", "3", "--load", save, "--save", save]) == 0
    assert "RNG states not restored" in capsys.readouterr().out
    assert "python" in ckpt.read_rank_state(ckpt.checkpoint_dir(save, 3), 0)  # the flag was not given this time


def test_exit_on_missing_checkpoint_refuses_resume_or_start(tmp_path, capsys):
    empty = str(tmp_path / "empty")
    # Without the flag, --load = --save naming no checkpoint trains from scratch (resume-or-start).
    assert main([*TINY, "--train-iters", "1", "--load", empty, "--save", str(tmp_path / "empty")]) == 0
    shutil.rmtree(empty)
    capsys.readouterr()
    assert main([*TINY, "--train-iters", "1", "--load", empty, "--save", empty, "--exit-on-missing-checkpoint"]) == 2
    assert capsys.readouterr().err == (f"megallama.pretrain: error: --load {empty} does not exist, and "
                                       "--exit-on-missing-checkpoint stops the run instead of training from scratch\n")
    assert main([*TINY, "--train-iters", "1", "--load", empty, "--exit-on-missing-checkpoint",
                 "--allow-no-checkpoint"]) == 2
    assert "contradict each other" in capsys.readouterr().err


def _norm(model) -> float:
    return float(torch.stack([p.detach().double().pow(2).sum() for p in model.parameters()]).sum().sqrt())


def test_log_params_norm_is_the_norm_of_the_weights_in_any_layout(tmp_path, capsys):
    save = str(tmp_path / "serial")
    assert main([*TINY, "--train-iters", "2", "--save", save, "--log-params-norm"]) == 0
    logged = {int(i): float(v) for i, v in PARAMS_NORM.findall(capsys.readouterr().out)}
    assert sorted(logged) == [1, 2]
    assert logged[2] == pytest.approx(_norm(load_model(save)[0]), rel=1e-6)  # printed to 7 digits
    # Each parameter counted once over TP shards, replicated norm weights and pipeline stages.
    result = torchrun(*TINY, "--train-iters", "2", "--log-params-norm", "--tensor-model-parallel-size", "2",
                      "--pipeline-model-parallel-size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    parallel = {int(i): float(v) for i, v in PARAMS_NORM.findall(result.stdout)}
    assert parallel == pytest.approx(logged, rel=1e-5)
    assert main([*TINY, "--train-iters", "1"]) == 0
    assert "params norm" not in capsys.readouterr().out  # only with the flag: it reads every weight
