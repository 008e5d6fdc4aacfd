"""Megatron's run-time flags in a real (one-process) run: --manual-gc, --num-workers, separate
train/valid data paths, the TensorBoard logging flags and Weights & Biases."""
import gc
import importlib.util
import re

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from megallama.pretrain import main
from megallama.training.arguments import parse_args
from megallama.training.logger import TrainingLogger

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--untie-embeddings-and-output-weights", "--seq-length", "16", "--vocab-size", "64", "--lr", "1e-3",
        "--lr-warmup-iters", "1", "--global-batch-size", "4", "--micro-batch-size", "2", "--log-interval", "1"]
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\d+ \|.*? lm loss (\S+) ")


pytestmark = pytest.mark.usefixtures("one_thread")


def losses(capsys, *flags) -> dict:
    assert main([*TINY, *flags]) == 0
    return {int(i): float(v) for i, v in LOSS_LINE.findall(capsys.readouterr().out)}


def test_manual_gc_and_worker_threads_leave_the_losses_unchanged(capsys, monkeypatch):
    reference = losses(capsys, "--mock-data", "--train-iters", "4", "--eval-iters", "0")
    collections = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: collections.append(gc.isenabled()) or collect(*args))
    got = losses(capsys, "--mock-data", "--train-iters", "4", "--eval-iters", "0", "--num-workers", "2",
                 "--manual-gc", "--manual-gc-interval", "2")
    assert got == reference and sorted(got) == [1, 2, 3, 4]  # bit for bit
    assert collections == [False, False, False]  # at the start, after iterations 2 and 4; collector off meanwhile
    assert gc.isenabled()


def write_dataset(prefix: str, low: int, high: int, rng) -> None:
    from megallama.data.indexed import IndexedDatasetWriter

    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for _ in range(40):
            writer.add_document(rng.integers(low, high, int(rng.integers(5, 40))))


def test_train_and_valid_data_paths_read_their_own_datasets(tmp_path, capsys):
    from megallama.training.loop import build_datasets

    rng = np.random.default_rng(0)
    train, valid = str(tmp_path / "train_text_document"), str(tmp_path / "valid_text_document")
    write_dataset(train, 0, 32, rng)  # the two sets have disjoint token ranges
    write_dataset(valid, 32, 64, rng)
    flags = ["--train-iters", "2", "--train-data-path", train, "--valid-data-path", valid, "--eval-interval", "2",
             "--eval-iters", "1", "--data-cache-path", str(tmp_path / "cache")]
    train_set, valid_set = build_datasets(parse_args([*TINY, *flags], env={}))
    assert len(train_set) >= 8 and len(valid_set) >= 4
    assert all(int(train_set[i]["tokens"].max()) < 32 for i in range(len(train_set)))
    assert all(int(valid_set[i]["tokens"].min()) >= 32 for i in range(len(valid_set)))
    assert main([*TINY, *flags]) == 0
    assert re.search(r"validation at iteration 2 \| lm loss validation \d\.\d+E\+00", capsys.readouterr().out)


def logged_run(tmp_path, *flags) -> TrainingLogger:
    config = parse_args([*TINY, "--mock-data", "--train-iters", "2", "--tensorboard-dir", str(tmp_path / "tb"),
                         *flags], env={})
    logger = TrainingLogger(config, enabled=True, num_devices=1, peak_tflops=None, print_fn=lambda line: None)
    if logger.wandb_run is not None:  # record what reaches the (real, offline) run
        logger.wandb_logged = []
        log = logger.wandb_run.log
        logger.wandb_run.log = lambda data, step: logger.wandb_logged.append((step, data)) or log(data, step=step)
    for iteration in (1, 2):
        logger.training_iteration(iteration, 4 * iteration, loss=3.0, lr=1e-3, grad_norm=0.5, seconds=0.5,
                                  phase_seconds={"batch-generator": 0.1, "forward-backward": 0.3, "optimizer": 0.1})
    logger.validation(2, 2.5)
    logger.close()
    return logger


def test_logging_flags_add_megatrons_tensorboard_scalars(tmp_path):
    logged_run(tmp_path, "--log-throughput", "--log-timers-to-tensorboard", "--log-memory-to-tensorboard",
               "--log-validation-ppl-to-tensorboard")
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"throughput", "batch-generator-time", "forward-backward-time", "optimizer-time", "mem-allocated-bytes",
            "lm loss validation ppl"} <= tags
    assert events.Scalars("lm loss validation ppl")[0].value == pytest.approx(np.exp(2.5), rel=1e-6)
    assert events.Scalars("forward-backward-time")[-1].value == pytest.approx(0.3)
    assert events.Scalars("mem-allocated-bytes")[0].value > 0


def test_without_the_flags_only_the_usual_scalars(tmp_path):
    logged_run(tmp_path)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert not tags & {"throughput", "forward-backward-time", "mem-allocated-bytes", "lm loss validation ppl"}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                    reason="wandb is not installed (pip install -e .[wandb])")
def test_wandb_offline_run_gets_the_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = logged_run(tmp_path, "--wandb-project", "megallama-test", "--wandb-exp-name", "tiny",
                        "--wandb-save-dir", str(tmp_path / "wandb"))
    assert (logger.wandb_run.project, logger.wandb_run.name) == ("megallama-test", "tiny")
    assert [step for step, _ in logger.wandb_logged] == [1, 2, 2]
    assert logger.wandb_logged[0][1]["lm loss"] == 3.0 and logger.wandb_logged[2][1] == {"lm loss validation": 2.5}
    assert list((tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb"))


def test_attention_backend_limits_the_sdpa_kernels():
    from megallama.training.run_contexts import attention_kernels

    with attention_kernels("unfused"):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    with attention_kernels("flash"):
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
    with attention_kernels("auto"):
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


def test_unfused_attention_trains_as_the_default_up_to_rounding(capsys):
    reference = losses(capsys, "--mock-data", "--train-iters", "2", "--eval-iters", "0")
    unfused = losses(capsys, "--mock-data", "--train-iters", "2", "--eval-iters", "0", "--attention-backend", "local")
    assert unfused == pytest.approx(reference, rel=1e-4)


def test_pytorch_profiler_records_the_chosen_iterations_and_leaves_the_losses_unchanged(tmp_path, capsys):
    import collections
    import json

    run = ["--mock-data", "--train-iters", "4", "--eval-iters", "0"]
    reference = losses(capsys, *run)
    assert main([*TINY, *run, "--profile", "--use-pytorch-profiler", "--profile-step-start", "1",
                 "--profile-step-end", "3", "--tensorboard-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert {int(i): float(v) for i, v in LOSS_LINE.findall(out)} == reference
    table = tmp_path / "rank0.iter1-3.txt"
    assert f"profile of iterations [1, 3) in {table}" in out
    text = table.read_text()
    assert text.startswith("rank 0, iterations [1, 3), sorted by own host time") and "aten::mm" in text
    trace = json.loads((tmp_path / "rank0.iter1-3.pt.trace.json").read_text())
    calls = collections.Counter(e.get("name") for e in trace["traceEvents"])
    # Iterations 1 and 2, two micro-batches each: two optimizer steps, four forwards.
    assert calls["Optimizer.step#AdamW.step"] == 2 and calls["aten::embedding"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_run_that_ends_inside_the_profiled_range_still_writes_it(tmp_path, capsys):
    assert main([*TINY, "--mock-data", "--train-iters", "2", "--eval-iters", "0", "--profile",
                 "--use-pytorch-profiler", "--profile-step-start", "1", "--tensorboard-dir", str(tmp_path)]) == 0
    assert (tmp_path / "rank0.iter1-12.txt").exists() and (tmp_path / "rank0.iter1-12.pt.trace.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--profile", "--use-pytorch-profiler"], "--use-pytorch-profiler needs --profile and --tensorboard-dir"),
    (["--use-pytorch-profiler", "--tensorboard-dir", "tb"], "--use-pytorch-profiler needs --profile"),
    (["--profile", "--profile-ranks", "0", "1"], r"--profile-ranks \[0, 1\]: ranks must be in \[0, 1\)"),
])
def test_profiler_flags_fail_before_any_work(flags, message):
    from megallama.training.arguments_model import ConfigError

    with pytest.raises(ConfigError, match=message):
        parse_args([*TINY, "--mock-data", "--train-iters", "2", *flags], env={})


def test_device_kernels_are_summed_by_kind():
    from megallama.training.profiling import device_time_by_kind

    kernels = [("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 50.0), ("nvjet_tst_128x256", 20.0),
               ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", 10.0),
               ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128", 5.0),
               ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 5.0), ("void at::native::vectorized_elementwise_kernel", 8.0),
               ("rms_norm_forward_kernel", 2.0)]
    assert device_time_by_kind(kernels) == {"matmul": 70.0, "attention": 15.0, "communication": 5.0, "other": 10.0}
