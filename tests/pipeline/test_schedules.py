"""Schedules, DDP buckets and optimizers under (TP, PP, DP) layouts equal the serial run (fp32).

Every interleaved layout runs with overlapped exchanges (the default) and again with synchronous
ones (``overlap_p2p_comm=False``): the two must be bit-identical."""
import pytest
import torch

from megallama.parallel import state
from megallama.pipeline import ActivationShape, build_model_chunks, get_forward_backward_func
from megallama.training.forward_step import llama_forward_step
from tests.distributed_utils import run_distributed
from tests.pipeline import harness as H

STEPS = 3
V3_LAYERS = 6  # interleaving with 3 chunks per rank at PP 2 needs layers divisible by 6


@pytest.fixture(scope="module")
def serial():
    return H.serial_run(H.config(), STEPS)


@pytest.fixture(scope="module")
def serial_v3():
    return H.serial_run(H.config(num_layers=V3_LAYERS), STEPS)


# (tp, pp, virtual, micro_batch, distributed optimizer)
TWO_RANK_LAYOUTS = [
    (1, 2, None, 1, False),   # 1F1B, 8 micro-batches
    (1, 2, 2, 1, False),      # interleaved, 8 micro-batches
    (1, 2, 2, 4, False),      # interleaved with micro-batches == stages: all warm-up
    (1, 2, 4, 2, True),       # interleaved, 4 chunks of one layer each
]
FOUR_RANK_LAYOUTS = [
    (1, 4, None, 1, False),   # 1F1B over 4 stages
    (1, 4, 2, 1, False),      # interleaved over 4 stages
    (1, 4, 2, 2, False),      # interleaved over 4 stages, micro-batches == stages: all warm-up
    (1, 4, None, 4, False),   # 1F1B with fewer micro-batches (2) than stages
    (1, 2, None, 1, False),   # PP 2 × DP 2
    (1, 2, 2, 1, True),       # PP 2 × DP 2, interleaved, distributed optimizer
    (1, 2, None, 2, True),    # PP 2 × DP 2, 1F1B, distributed optimizer
    (1, 1, None, 1, False),   # DP 4
    (1, 1, None, 1, True),    # DP 4, distributed optimizer
]


# (sequence parallel, (tp, pp, virtual, micro_batch, distributed optimizer))
TENSOR_PARALLEL_LAYOUTS = [
    (False, (2, 2, None, 1, False)),  # TP 2 × PP 2, 1F1B
    (True, (2, 2, 2, 1, False)),      # TP 2 × PP 2, interleaved, sequence parallel
    (False, (2, 1, None, 2, True)),   # TP 2 × DP 2, distributed optimizer
    (True, (2, 1, None, 1, False)),   # TP 2 × DP 2, sequence parallel
]


def _interleaved(layouts):
    return [i for i, layout in enumerate(layouts) if layout[2]]


def _train_layouts(layouts):
    return {"overlap": [H.parallel_run(H.config(), *layout, STEPS) for layout in layouts],
            "synchronous": [H.parallel_run(H.config(), *layouts[i], STEPS, overlap_p2p_comm=False)
                            for i in _interleaved(layouts)]}


def _train_tensor_parallel_layouts(layouts):
    def run(sp, layout, overlap):
        return H.parallel_run(H.config(sequence_parallel=sp), *layout, STEPS, overlap_p2p_comm=overlap)
    return {"overlap": [run(sp, layout, True) for sp, layout in layouts],
            "synchronous": [run(*layouts[i], False) for i in _interleaved([lay for _, lay in layouts])]}


def _check_layouts(layouts, results, serial):
    """Each layout equals the serial run; each interleaved one is the same bit for bit without overlap."""
    for i, _ in enumerate(layouts):
        H.check_against_serial([r["overlap"][i] for r in results], serial)
    for j, i in enumerate(_interleaved(layouts)):
        H.check_identical([r["overlap"][i] for r in results], [r["synchronous"][j] for r in results])


class _RecordingForwardStep:
    """Checks, at every forward, that the outputs this stage already sent were freed."""

    def __init__(self):
        self.sent, self.checked = [], 0

    def __call__(self, data_iterator, chunk, input_tensor):
        for out in self.sent:
            assert out.numel() == 1, f"a sent activation still holds {out.numel()} elements"
            self.checked += 1
        output, loss_func = llama_forward_step(data_iterator, chunk, input_tensor)
        if not chunk.post_process:
            self.sent.append(output)
        return output, loss_func


def _schedule_properties():
    cfg = H.config()
    out = {}
    # 1F1B; interleaved with overlap, without, and with micro-batches == stages (all warm-up)
    out["eval"] = [H.parallel_eval(cfg, 2, None, 2), H.parallel_eval(cfg, 2, 2, 1),
                   H.parallel_eval(cfg, 2, 2, 1, overlap_p2p_comm=False), H.parallel_eval(cfg, 2, 2, 4),
                   H.parallel_eval(cfg, 2, 2, 4, overlap_p2p_comm=False)]
    state.initialize_model_parallel(1, 2, 2)
    try:
        chunks = build_model_chunks(lambda s: H.LlamaModel(cfg, pre_process=s.pre_process,
                                                           post_process=s.post_process,
                                                           layer_ids=s.layer_ids), cfg, 2)
        tokens, labels = H.batch(0)
        data = [(tokens[i:i + 1], labels[i:i + 1]) for i in range(8)]
        shape = ActivationShape(H.SEQ, 1, cfg.hidden_size)
        out["freed_checks"] = []
        for overlap in (True, False):
            step = _RecordingForwardStep()
            get_forward_backward_func(2, 2, overlap)(step, [iter(data), iter(data)], chunks, 8, shape)
            out["freed_checks"].append(step.checked)
        interleaved = get_forward_backward_func(2, 2)
        errors = []
        for bad in (lambda: interleaved(step, [iter(data), iter(data)], chunks, 3, shape),
                    lambda: interleaved(step, iter(data), chunks, 2, shape),
                    lambda: interleaved(step, [iter(data)] * 2, chunks[:1], 2, shape)):
            try:
                bad()
                errors.append(None)
            except ValueError as exc:
                errors.append(str(exc))
        out["errors"] = errors
    finally:
        state.destroy_model_parallel()
    # DP 2: buckets start reducing from the backward hooks of the last micro-batch only; the
    # bucket holding a parameter that gets no gradient is reduced by finish_grad_sync.
    state.initialize_model_parallel(1, 1)
    try:
        model = H.LlamaModel(cfg)
        model.unused = torch.nn.Parameter(torch.ones(3))
        chunk = H.DistributedDataParallel(model, bucket_size=3000)
        with chunk.no_sync():
            chunk(tokens[:2], labels=labels[:2]).sum().backward()
        launched_in_no_sync = sum(b.work is not None for b in chunk.buckets)
        chunk(tokens[2:4], labels=labels[2:4]).sum().backward()
        launched_by_backward = sum(b.work is not None for b in chunk.buckets)
        chunk.finish_grad_sync()
        out["buckets"] = (len(chunk.buckets), launched_in_no_sync, launched_by_backward,
                          float(model.unused.main_grad.abs().sum()))
    finally:
        state.destroy_model_parallel()
    # An inf gradient on stage 0 at step 1: every rank skips that step, and only that one.
    out["inf"] = H.parallel_run(cfg, 1, 2, None, 1, False, 3, inject_inf_at=(1, 0))["applied"]
    return out


def _two_rank_work():
    return {"layouts": _train_layouts(TWO_RANK_LAYOUTS), "properties": _schedule_properties(),
            # Full recompute: a sent (freed) output must not be needed by the re-run forward.
            "recompute": H.parallel_run(H.config(recompute_granularity="full"), 1, 2, 2, 1, False, STEPS),
            "v3": [H.parallel_run(H.config(num_layers=V3_LAYERS), 1, 2, 3, 1, False, STEPS, overlap_p2p_comm=o)
                   for o in (True, False)]}


def _four_rank_work():
    return {"layouts": _train_layouts(FOUR_RANK_LAYOUTS),
            "tensor_parallel": _train_tensor_parallel_layouts(TENSOR_PARALLEL_LAYOUTS),
            # forward only, interleaved over 4 stages: overlapped, synchronous, all warm-up
            "eval": [H.parallel_eval(H.config(), 4, 2, mb, overlap_p2p_comm=o) for mb, o in
                     ((1, True), (1, False), (2, True))]}


# One spawn per world size for all checks: starting processes is the expensive part.
@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_two_rank_work, 2, timeout=280)


@pytest.fixture(scope="module")
def four_ranks():
    return run_distributed(_four_rank_work, 4, timeout=400)


def test_two_stage_layouts_equal_serial(serial, two_ranks):
    _check_layouts(TWO_RANK_LAYOUTS, [r["layouts"] for r in two_ranks], serial)
    H.check_against_serial([r["recompute"] for r in two_ranks], serial)
    assert serial[1][0] > H.OPT["clip_grad"], "clipping must be active for the norm to matter"


def test_three_chunks_per_rank_equal_serial_with_and_without_overlap(serial_v3, two_ranks):
    overlap, synchronous = ([r["v3"][i] for r in two_ranks] for i in (0, 1))
    H.check_against_serial(overlap, serial_v3)
    H.check_identical(overlap, synchronous)


def test_four_rank_layouts_equal_serial(serial, four_ranks):
    _check_layouts(FOUR_RANK_LAYOUTS, [r["layouts"] for r in four_ranks], serial)


def test_tensor_parallel_layouts_equal_serial(serial, four_ranks):
    _check_layouts([layout for _, layout in TENSOR_PARALLEL_LAYOUTS], [r["tensor_parallel"] for r in four_ranks],
                   serial)


def test_four_stage_forward_only_equals_serial(four_ranks):
    expected = H.serial_eval(H.config())
    assert [r["eval"] for r in four_ranks[:3]] == [[None] * 3] * 3
    overlap, synchronous, all_warmup = four_ranks[3]["eval"]
    assert overlap == synchronous == pytest.approx(expected, rel=1e-6)
    assert all_warmup == pytest.approx(expected, rel=1e-6)


def test_schedule_properties(two_ranks):
    results = [r["properties"] for r in two_ranks]
    expected = H.serial_eval(H.config())
    for value in results[1]["eval"]:  # the last stage reports the loss
        assert value == pytest.approx(expected, rel=1e-6)
    _, overlap, synchronous, all_warmup, all_warmup_synchronous = results[1]["eval"]
    assert overlap == synchronous and all_warmup == all_warmup_synchronous
    assert results[0]["eval"] == [None] * 5
    # Rank 0 sends 8 micro-batches × 2 chunks, rank 1 8 × 1 (its last chunk sends nothing); with
    # overlap or without, each is freed before the next forward.
    for r in results:
        assert all(checks > 0 for checks in r["freed_checks"])
    for r in results:
        first, second, third = r["errors"]
        assert "micro-batches (3) divisible by pipeline_model_parallel_size (2)" in first
        assert "list of 2 data iterators" in second
        assert "runs 2 model chunk(s) per rank, got 1" in third
        assert r["inf"] == [True, False, True]
        num_buckets, in_no_sync, by_backward, unused_grad = r["buckets"]
        assert num_buckets > 2 and in_no_sync == 0 and by_backward == num_buckets - 1
        assert unused_grad == 0.0
