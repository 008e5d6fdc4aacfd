"""megallama checkpoints: read whatever layout saved them, written as training lays them out, and
loadable by `megallama.pretrain` (optimizer state included when the source is megallama)."""
import io
import json
import os
import re
import socket
import subprocess
import sys
from contextlib import redirect_stdout

import pytest
import torch
import transformers

from megallama.checkpoint import convert_checkpoint, load_model
from megallama.pretrain import main as pretrain
from megallama.checkpoint import storage as ckpt
from tests.inference.conftest import load_tool

TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--untie-embeddings-and-output-weights",
        "--seq-length", "16", "--vocab-size", "63", "--mock-data", "--global-batch-size", "4", "--micro-batch-size",
        "2", "--lr", "1e-3", "--lr-warmup-iters", "1", "--lr-decay-iters", "6", "--log-interval", "1",
        "--eval-iters", "0"]
LOSS = re.compile(r"iteration\s+(\d+)/\d+ \|.*? lm loss (\S+) ")


def train(*flags) -> dict:
    out = io.StringIO()
    with redirect_stdout(out):
        assert pretrain([*TINY, *flags]) == 0
    return {int(i): float(v) for i, v in LOSS.findall(out.getvalue())}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A serial run saved at iteration 2, and the losses of its iterations 3-4 when resumed."""
    save = str(tmp_path_factory.mktemp("trained"))
    train("--train-iters", "2", "--save", save)
    resumed = train("--train-iters", "4", "--load", save)
    return save, resumed


def test_resharded_checkpoint_resumes_exactly(trained, tmp_path):
    save, resumed = trained
    target = str(tmp_path / "tp2pp2")
    cli = load_tool("convert_checkpoint")
    assert cli.main(["--load", save, "--save", target, "--target-format", "megallama",
                     "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]) == 0
    assert ckpt.read_tracker(target) == 2
    assert sorted(os.listdir(ckpt.checkpoint_dir(target, 2))) == ["metadata.json"] + [f"rank_{r:05d}.pt" for r in range(4)]
    ids = torch.randint(0, 63, (2, 16))
    assert torch.equal(load_model(target)[0](ids), load_model(save)[0](ids))
    # weights, AdamW moments, iteration and consumed samples came along: the losses go on bit for bit
    assert train("--train-iters", "4", "--load", target) == resumed


def test_hf_round_trip_and_training_from_an_imported_checkpoint(trained, tmp_path):
    save, _ = trained
    hf_dir, back = str(tmp_path / "hf"), str(tmp_path / "back")
    convert_checkpoint(save, hf_dir, "hf", progress=False)
    ours = load_model(save)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = torch.randint(0, 63, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    convert_checkpoint(hf_dir, back, "megallama", target_tensor_parallel_size=2, progress=False)
    assert ckpt.read_tracker(back) == 0
    assert torch.equal(load_model(back)[0](ids), ours(ids))
    # the training entry point starts from the imported weights (fresh optimizer, iteration 0)
    losses = train("--train-iters", "2", "--load", back, "--lr-decay-iters", "2")
    assert sorted(losses) == [1, 2] and all(v == v for v in losses.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_written_layout_is_the_one_training_saves(trained, tmp_path):
    """A TP=2 run's own checkpoint and ours converted to TP=2 hold the same pieces in the same files."""
    save, _ = trained
    by_training = str(tmp_path / "by_training")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}", "-m", "megallama.pretrain", *TINY, "--train-iters", "3",
               "--load", save, "--save", by_training, "--tensor-model-parallel-size", "2"]
    result = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = str(tmp_path / "ours")
    convert_checkpoint(by_training, ours, "megallama", target_tensor_parallel_size=2, progress=False)

    def layout(root):
        iteration = ckpt.read_tracker(root)
        with open(os.path.join(ckpt.checkpoint_dir(root, iteration), "metadata.json")) as f:
            pieces = json.load(f)["pieces"]
        return {k: sorted((e["file"], tuple(e["offsets"]), tuple(e["shape"]), e["flat_range"] is None) for e in v)
                for k, v in pieces.items()}

    assert layout(ours) == layout(by_training)
    a, b = load_model(by_training)[1], load_model(ours)[1]
    assert all(torch.equal(a.load_key(k), b.load_key(k)) for k in a.keys())


def test_same_layout_keeps_rank_states_and_a_new_one_marks_them_absent(trained, tmp_path):
    save, resumed = trained
    same, other = str(tmp_path / "same"), str(tmp_path / "other")
    convert_checkpoint(save, same, "megallama", progress=False)
    convert_checkpoint(save, other, "megallama", target_tensor_parallel_size=2, progress=False)
    source_dir, same_dir = ckpt.checkpoint_dir(save, 2), ckpt.checkpoint_dir(same, 2)
    assert torch.equal(ckpt.read_rank_state(same_dir, 0)["torch"], ckpt.read_rank_state(source_dir, 0)["torch"])
    assert ckpt.read_metadata(same_dir)["common"]["layout"] == ckpt.read_metadata(source_dir)["common"]["layout"]
    assert "rng_states" in ckpt.read_metadata(ckpt.checkpoint_dir(other, 2))["common"]["layout"]
    assert train("--train-iters", "4", "--load", same) == resumed  # RNG states restored, nothing else changes
