"""A checkpoint written before the checkpoint package existed (TP=2, the old run-configuration
layout) still loads for inference with the logits it gave then, resumes training at TP=1 with the
losses it gave then, and converts to HF and back."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from megallama.checkpoint import convert_checkpoint, detect_format, load_model

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "checkpoint_pre14")
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*? lm loss (\S+) ")


@pytest.fixture(scope="module")
def expected() -> dict:
    with open(os.path.join(FIXTURE, "expected.json")) as f:
        return json.load(f)


@pytest.fixture
def checkpoint(tmp_path) -> str:
    """A copy of the fixture's save folder: nothing ever writes into tests/fixtures."""
    return shutil.copytree(os.path.join(FIXTURE, "ckpt"), tmp_path / "ckpt")


def _last_logits(path: str, input_ids: list) -> torch.Tensor:
    model, _ = load_model(path)
    with torch.no_grad():
        return model(torch.tensor(input_ids))[0, -1]


def _recorded_flags(expected: dict) -> list[str]:
    """The flags that wrote the fixture, less its save folder, length and TP (set per test)."""
    words = shlex.split(expected["written_by"].split("-m megallama.pretrain", 1)[1])
    kept, dropped = [], ("--save", "--train-iters", "--tensor-model-parallel-size")
    for i, word in enumerate(words):
        flag = word if word.startswith("--") else words[i - 1]  # a value belongs to the flag before it
        if flag not in dropped:
            kept.append(word)
    return kept


def test_loads_with_the_logits_it_gave(checkpoint, expected):
    assert detect_format(checkpoint) == "megallama"
    torch.testing.assert_close(_last_logits(checkpoint, expected["input_ids"]),
                               torch.tensor(expected["logits_last"]), rtol=0, atol=1e-5)


def test_resumes_at_tp1_with_the_losses_it_gave(checkpoint, expected, tmp_path):
    # Explicit shapes meant untied embeddings when the fixture was written; now, as Megatron, tied.
    # The fixture recorded its schedule (decay over its 2 iterations); the losses it gave then were
    # resumed on the flags' (decay over 4), which a resume now has to ask for.
    command = [sys.executable, "-m", "megallama.pretrain", *_recorded_flags(expected),
               "--untie-embeddings-and-output-weights", "--train-iters", "4", "--override-opt_param-scheduler",
               "--log-interval", "1", "--load", str(checkpoint), "--save", str(tmp_path / "resumed")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = {int(i): float(v) for i, v in LOSS.findall(result.stdout)}
    assert sorted(losses) == [3, 4], result.stdout[-3000:]
    assert [losses[3], losses[4]] == pytest.approx(expected["resume_to_iteration_4_losses"], rel=1e-5)


def test_converts_to_hf_and_back(checkpoint, expected, tmp_path):
    hf, back = str(tmp_path / "hf"), str(tmp_path / "back")
    assert convert_checkpoint(checkpoint, hf, "hf", progress=False) == "megallama"
    assert convert_checkpoint(hf, back, "megallama", target_tensor_parallel_size=2, progress=False) == "hf"
    logits = torch.tensor(expected["logits_last"])
    for path in (hf, back):
        torch.testing.assert_close(_last_logits(path, expected["input_ids"]), logits, rtol=0, atol=1e-5)
