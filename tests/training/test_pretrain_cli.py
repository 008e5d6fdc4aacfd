"""`megallama.pretrain` end to end: parallel layouts equal the serial run, exact resume, resume into
other layouts, a two-node launch, and bad configurations stopping every rank.

The serial runs go through ``main()`` in this process (cheap); parallel layouts are real torchrun
launches of 4 gloo processes (few of them, each covering several checks).
"""
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megallama.pretrain import main
from megallama.checkpoint import storage as ckpt
from megallama.training.logger import TAGS

ITERS = 8
TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--untie-embeddings-and-output-weights",
        "--seq-length", "16", "--vocab-size", "64", "--lr", "1e-3", "--lr-warmup-iters", "2",
        "--lr-decay-iters", str(ITERS), "--mock-data", "--global-batch-size", "8", "--micro-batch-size", "2",
        "--log-interval", "1", "--eval-iters", "0"]
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\d+ \|.*? lm loss (\S+) ")


def losses_of(text: str) -> dict:
    return {int(i): float(v) for i, v in LOSS_LINE.findall(text)}


def run_serial(capsys, *flags) -> dict:
    assert main([*TINY, *flags]) == 0
    return losses_of(capsys.readouterr().out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*flags, nproc=4, launcher=(), timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *launcher,
               "-m", "megallama.pretrain", *flags]
    if not launcher:
        command[4:4] = ["--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def assert_curve(got: dict, expected: dict, iterations, rtol=1e-4):
    assert sorted(got) == list(iterations), got
    torch.testing.assert_close(torch.tensor([got[i] for i in iterations]),
                               torch.tensor([expected[i] for i in iterations]), rtol=rtol, atol=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The reference: an uninterrupted serial run, and a serial run stopped (and saved) at iteration 4."""
    import io
    from contextlib import redirect_stdout

    stopped = str(tmp_path_factory.mktemp("serial_stopped"))
    out = io.StringIO()
    with redirect_stdout(out):
        assert main([*TINY, "--train-iters", str(ITERS)]) == 0
        full = losses_of(out.getvalue())
        out.truncate(0)
        assert main([*TINY, "--train-iters", "4", "--save", stopped]) == 0
        first_half = losses_of(out.getvalue())
    return {"losses": full, "first_half": first_half, "checkpoint": stopped}


def test_serial_resume_is_exact(serial, capsys, tmp_path):
    assert sorted(serial["losses"]) == list(range(1, ITERS + 1))
    assert serial["first_half"] == {i: serial["losses"][i] for i in range(1, 5)}
    assert ckpt.read_tracker(serial["checkpoint"]) == 4
    resumed = run_serial(capsys, "--train-iters", str(ITERS), "--load", serial["checkpoint"], "--save", str(tmp_path))
    assert resumed == {i: serial["losses"][i] for i in range(5, ITERS + 1)}  # bit for bit


def test_tensor_pipeline_sequence_parallel_layout_equals_serial(serial, tmp_path):
    result = torchrun(*TINY, "--train-iters", str(ITERS), "--tensor-model-parallel-size", "2",
                      "--pipeline-model-parallel-size", "2", "--sequence-parallel",
                      "--tensorboard-dir", str(tmp_path / "tb"), "--eval-interval", "4", "--eval-iters", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_curve(losses_of(result.stdout), serial["losses"], range(1, ITERS + 1))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(TAGS) - {"mfu"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("lm loss validation")] == [4, 8]


def test_interleaved_zero_layout_equals_serial_and_its_checkpoint_resumes_serially(serial, capsys, tmp_path):
    save = str(tmp_path / "zero")
    # the weight all-gathers still in flight when iteration 4 saves: the save waits for them
    result = torchrun(*TINY, "--train-iters", str(ITERS), "--pipeline-model-parallel-size", "2",
                      "--num-layers-per-virtual-pipeline-stage", "1", "--use-distributed-optimizer",
                      "--overlap-param-gather", "--save", save, "--save-interval", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_curve(losses_of(result.stdout), serial["losses"], range(1, ITERS + 1))
    # ZeRO shards of DP=2 with two model chunks per rank → one serial process, from iteration 4.
    resumed = run_serial(capsys, "--train-iters", str(ITERS), "--load", save, "--ckpt-step", "4")
    assert_curve(resumed, serial["losses"], range(5, ITERS + 1))


def test_two_node_launch_resumes_a_serial_checkpoint_in_a_sharded_layout(serial, tmp_path):
    port = free_port()
    flags = [*TINY, "--train-iters", str(ITERS), "--tensor-model-parallel-size", "2", "--sequence-parallel",
             "--use-distributed-optimizer", "--load", serial["checkpoint"]]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={n}",
                               "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={port}",
                               "-m", "megallama.pretrain", *flags],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(2)]
    outputs = [node.communicate(timeout=240) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
    # The reporting rank (the last) runs on node 1.
    assert_curve(losses_of(outputs[1][0]), serial["losses"], range(5, ITERS + 1))


def test_bad_configuration_stops_every_rank_with_one_line():
    result = torchrun(*TINY, "--train-iters", "2", "--tensor-model-parallel-size", "4", nproc=2, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("megallama.pretrain: error:")]
    # Each rank reports (torchrun may stop the second before it does): one line, naming the rank.
    assert errors and all(re.fullmatch(r"megallama\.pretrain: error: \[rank [01]\] world size 2 is not divisible by "
                                       r"--tensor-model-parallel-size 4 × --pipeline-model-parallel-size 1 = 4", e)
                          for e in errors), errors


def test_missing_data_exits_before_work(tmp_path, capsys):
    flags = [f for f in TINY if f != "--mock-data"]
    assert main([*flags, "--train-iters", "2", "--data-path", str(tmp_path / "none_text_document")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"megallama.pretrain: error: data file {tmp_path}/none_text_document.bin not found " \
                  f"(from --data-path {tmp_path}/none_text_document)"


def test_non_finite_loss_stops_naming_the_iteration_and_saves_nothing_after(tmp_path, capsys, monkeypatch):
    from megallama.training import loop

    calls, original = [], loop.global_mean_loss

    def poisoned(losses):
        calls.append(1)
        mean = original(losses)
        return mean * float("nan") if len(calls) == 3 else mean

    monkeypatch.setattr(loop, "global_mean_loss", poisoned)
    assert main([*TINY, "--train-iters", "5", "--save", str(tmp_path), "--save-interval", "1"]) == 1
    err = capsys.readouterr().err
    assert "iteration 3: lm loss nan" in err and "without saving" in err
    assert ckpt.read_tracker(str(tmp_path)) == 2 and not os.path.exists(ckpt.checkpoint_dir(str(tmp_path), 3))


def test_trains_on_a_blend_of_indexed_datasets_with_validation(tmp_path, capsys):
    import numpy as np

    from megallama.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    prefixes = []
    for name in ("web", "books"):
        prefix = str(tmp_path / f"{name}_text_document")
        with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
            for _ in range(60):
                writer.add_document(rng.integers(0, 64, int(rng.integers(5, 40))))
        prefixes.append(prefix)
    flags = [f for f in TINY if f not in ("--mock-data", "--eval-iters", "0")]
    assert main([*flags, "--train-iters", "3", "--data-path", "0.7", prefixes[0], "0.3", prefixes[1],
                 "--split", "90,10,0", "--eval-interval", "3", "--eval-iters", "2",
                 "--data-cache-path", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert sorted(losses_of(out)) == [1, 2, 3]
    assert re.search(r"validation at iteration 3 \| lm loss validation \d\.\d+E\+00", out)


def test_full_recompute_gives_the_same_losses(serial, capsys):
    losses = run_serial(capsys, "--train-iters", "3", "--recompute-granularity", "full")
    assert_curve(losses, serial["losses"], range(1, 4), rtol=1e-6)


def test_gradient_accumulation_fusion_changes_nothing_but_where_gradients_are_added(serial, capsys):
    # fp32: the fused GEMM adds into the buffer what the unfused one adds after it (equal curves);
    # bf16 on CPU: the same bf16 product, added the same way
    unfused = run_serial(capsys, "--train-iters", "3", "--no-gradient-accumulation-fusion")
    assert_curve(unfused, serial["losses"], range(1, 4), rtol=1e-6)
    fused_bf16 = run_serial(capsys, "--bf16", "--train-iters", "3")
    assert run_serial(capsys, "--bf16", "--train-iters", "3", "--no-gradient-accumulation-fusion") == fused_bf16


def test_bf16_tracks_fp32_and_resumes_exactly(serial, capsys, tmp_path):
    bf16 = run_serial(capsys, "--bf16", "--train-iters", "4", "--save", str(tmp_path), "--save-interval", "2")
    assert_curve(bf16, serial["losses"], range(1, 5), rtol=2e-2)
    resumed = run_serial(capsys, "--bf16", "--train-iters", "4", "--load", str(tmp_path), "--ckpt-step", "2")
    assert resumed == {3: bf16[3], 4: bf16[4]}


def test_checkpoint_of_another_shape_is_a_one_line_error(serial, capsys):
    flags = [*TINY, "--train-iters", str(ITERS), "--load", serial["checkpoint"]]
    flags[flags.index("--hidden-size") + 1] = "64"
    assert main(flags) == 2  # from the stored run config, before the data and the model are built
    err = capsys.readouterr().err.strip()
    assert err == (f"megallama.pretrain: error: --load {serial['checkpoint']} (iteration 4) has hidden_size 32, "
                   "the flags give 64: resume with the flags it was trained with")


def test_a_checkpoint_at_or_past_train_iters_says_there_is_nothing_to_do(serial, capsys):
    # The run ended without a word, its first line saying "training … from iteration 4".
    assert run_serial(capsys, "--train-iters", "3", "--load", serial["checkpoint"]) == {}
    assert main([*TINY, "--train-iters", "4", "--load", serial["checkpoint"]]) == 0
    assert "the checkpoint's iteration 4 is already at --train-iters 4: done" in capsys.readouterr().out
