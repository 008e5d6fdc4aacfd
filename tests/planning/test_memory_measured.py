"""The planner's memory model against what the trainer really allocates on CPU (gloo ranks): each
rank's peak of live allocated bytes in a training iteration, from the profiler's allocation
records, within ±10% of the prediction for that rank.

Iterations 2-4 are measured (they hold the AdamW moments) and the smallest peak counts: each does
the same work. Tensor-parallel and sequence-parallel runs start every iteration where the previous
one started (the buffers of the asynchronous collectives in ``megallama.parallel.mappings`` are
freed on this thread once gloo's worker has let go of them, so the profiler records every free:
tests/parallel/test_sp_memory.py checks it). Distributed-optimizer runs still keep bytes from one
iteration into the next: their last reduce-scatter staging copy is still referenced by gloo when
the next step starts (the weight all-gathers write into the parameters: no buffer), and dropped
later on gloo's worker thread, where the profiler does not record the free (a gloo detail, in
megallama/distributed). For those,
what is allocated when an iteration starts beyond the model's static state (weights, gradients,
optimizer state, the step's tokens) is taken off that iteration's peak: it is not part of the
step, and the model predicts no backend's late frees.
"""
import pytest
import torch

from megallama.config import LlamaConfig
from megallama.planning.layout import Layout, Workload
from megallama.planning.memory import training_memory
from megallama.training.loop import shutdown
from tests.distributed_utils import run_distributed
from tests.planning.measure import train_and_measure

MODEL = dict(num_layers=4, hidden_size=128, num_attention_heads=4, ffn_hidden_size=352, vocab_size=1000)
GLOBAL_BATCH = 8


def flags(layout: Layout, seq: int, bf16: bool, fusion: bool = True) -> list:
    f = ["--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--ffn-hidden-size", "352",
         "--untie-embeddings-and-output-weights",
         "--vocab-size", "1000", "--seq-length", str(seq), "--mock-data", "--global-batch-size", str(GLOBAL_BATCH),
         "--micro-batch-size", str(layout.micro_batch_size), "--train-iters", "4", "--log-interval", "1",
         "--eval-iters", "0", "--lr-warmup-iters", "0",
         "--tensor-model-parallel-size", str(layout.tp), "--pipeline-model-parallel-size", str(layout.pp)]
    if layout.virtual > 1:
        f += ["--num-layers-per-virtual-pipeline-stage", str(MODEL["num_layers"] // (layout.pp * layout.virtual))]
    f += ["--sequence-parallel"] * layout.sequence_parallel + ["--bf16"] * bf16
    f += ["--use-distributed-optimizer"] * layout.distributed_optimizer
    f += ["--recompute-granularity", "full"] * layout.full_recompute
    f += ["--no-gradient-accumulation-fusion"] * (not fusion)
    return f


def predicted(layout: Layout, seq: int, bf16: bool, fusion: bool = True) -> list:
    """(peak, static bytes) of every pipeline rank."""
    workload = Workload(LlamaConfig(**MODEL, max_position_embeddings=seq), seq, GLOBAL_BATCH, bf16, fusion)
    return [(r.total, r.weights + r.gradients + r.main_weights + r.optimizer_states + r.data)
            for r in training_memory(workload, layout, staged_reduce_scatter=True)]  # gloo copies its input


def _measure(layout_flags, world_size):
    return train_and_measure(layout_flags, world_size)


# name: (layout, sequence length, bf16[, gradient-accumulation fusion: default on])
LAYOUTS = {
    "serial": (Layout(micro_batch_size=2), 128, False),
    "serial-bf16": (Layout(micro_batch_size=2), 128, True),
    "serial-bf16-unfused": (Layout(micro_batch_size=2), 128, True, False),
    "serial-full-recompute": (Layout(micro_batch_size=2, recompute="full"), 128, False),
    "tp2": (Layout(tp=2, micro_batch_size=2), 128, False),
    "tp2-sp": (Layout(tp=2, micro_batch_size=2, sequence_parallel=True), 512, False),
    "pp2-1f1b": (Layout(pp=2, micro_batch_size=1), 128, False),
    "pp2-interleaved": (Layout(pp=2, micro_batch_size=1, virtual=2), 128, False),
    "dp2": (Layout(dp=2, micro_batch_size=2), 128, False),
    "dp2-distributed-optimizer": (Layout(dp=2, micro_batch_size=2, distributed_optimizer=True), 128, False),
}
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_peak_memory_within_ten_percent(name):
    layout, seq, bf16, *fusion = LAYOUTS[name]
    run_flags = flags(layout, seq, bf16, *fusion)
    if layout.world_size == 1:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            results = [train_and_measure(run_flags, 1)]
        finally:
            shutdown()
            torch.set_num_threads(before)
    else:
        results = run_distributed(_measure, layout.world_size, run_flags, layout.world_size, timeout=240)
    expected = predicted(layout, seq, bf16, *fusion)
    for r in results:
        want, static = expected[r["pipeline_rank"]]
        carries_over = layout.distributed_optimizer
        left_over = (lambda start: max(0, start - static)) if carries_over else (lambda start: 0)
        got = min(peak - left_over(start) for start, peak in r["iterations"][1:])
        assert abs(got / want - 1) <= 0.10, (
            f"{layout.describe()}: pipeline rank {r['pipeline_rank']} peaked at {got / 1e6:.2f} MB, "
            f"the planner says {want / 1e6:.2f} MB (per iteration, MB at start and peak: "
            f"{[(round(a / 1e6, 2), round(b / 1e6, 2)) for a, b in r['iterations']]})")
