"""The memory model against ``torch.cuda.max_memory_allocated`` of a real bf16 run on one GPU
(skipped without one; `bash bench/gpu_check.sh` runs the CUDA tests)."""
import pytest
import torch

from megallama.planning.memory import training_memory
from megallama.planning.report import pretrain_workload_and_layout
from megallama.training.arguments import parse_args
from megallama.training.loop import Trainer, shutdown

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_peak_allocated_on_gpu_within_ten_percent():
    flags = ["--num-layers", "4", "--hidden-size", "1024", "--num-attention-heads", "8", "--seq-length", "1024",
             "--untie-embeddings-and-output-weights",
             "--vocab-size", "32000", "--mock-data", "--micro-batch-size", "2", "--global-batch-size", "4",
             "--train-iters", "2", "--bf16", "--eval-iters", "0", "--lr-warmup-iters", "0", "--log-interval", "1"]
    config = parse_args(flags, env={"WORLD_SIZE": "1"}, check_files=False)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        Trainer(config, print_fn=lambda *a: None).train()
    finally:
        shutdown()
    peak = torch.cuda.max_memory_allocated() - before
    predicted = training_memory(*pretrain_workload_and_layout(config))[0].total
    assert abs(peak / predicted - 1) <= 0.10, (peak, predicted)
