"""Gradient-accumulation fusion (Megatron's): the linear layers' weight-gradient products add into
DDP's fp32 ``main_grad`` themselves. Training equals the serial run under every kind of layout whose
bookkeeping it touches: micro-batches accumulated, buckets reduced during backward, tied embeddings
(one stage: not fused; a last stage's copy: fused), key/value heads replicated over TP ranks (their
sum over ranks comes first: not fused), sequence parallelism, ZeRO-1, full recompute."""
import pytest
import torch

from megallama.distributed import DistributedDataParallel
from megallama.parallel import state
from tests.distributed_utils import run_distributed
from tests.pipeline import harness as H

STEPS = 3
# (config overrides, (tp, pp, virtual, micro_batch, distributed optimizer)), 4 ranks each
LAYOUTS = [
    (dict(sequence_parallel=True, num_query_groups=1), (2, 1, None, 1, True)),  # KV heads replicated
    (dict(tie_word_embeddings=True), (1, 1, None, 1, False)),                   # tied, one stage, DP 4
    (dict(tie_word_embeddings=True), (1, 2, None, 2, True)),                    # tied copy on the last stage
    (dict(recompute_granularity="full"), (1, 2, 2, 1, False)),                  # interleaved, recomputed
]


def _fused_layouts():
    return [H.parallel_run(H.config(**overrides), *layout, STEPS, gradient_accumulation_fusion=True)
            for overrides, layout in LAYOUTS]


@pytest.fixture(scope="module")
def fused():
    return run_distributed(_fused_layouts, 4, timeout=300)


@pytest.mark.parametrize("index", range(len(LAYOUTS)))
def test_fused_layouts_equal_serial(fused, index):
    overrides, _ = LAYOUTS[index]
    serial = H.serial_run(H.config(**{k: v for k, v in overrides.items() if k != "sequence_parallel"}), STEPS)
    H.check_against_serial([r[index] for r in fused], serial)


def _gradients(fusion: bool, tied: bool):
    """One chunk on one rank: main_grad after two micro-batches, and which parameters went through
    autograd's accumulation hook."""
    cfg = H.config(num_layers=2, tie_word_embeddings=tied)
    full = H.initial_state(cfg)
    state.initialize_model_parallel(1, 1)
    try:
        model = H.LlamaModel(cfg)
        model.load_state_dict(full)
        names = {p: n for n, p in model.named_parameters()}
        hooked = set()
        original = DistributedDataParallel._grad_ready

        def recording(self, param):
            if param.grad is not None:  # autograd runs the hook for a fused weight too, with no gradient
                hooked.add(names[param])
            original(self, param)

        DistributedDataParallel._grad_ready = recording  # this rank's process only; bound at construction
        try:
            chunk = DistributedDataParallel(model, gradient_accumulation_fusion=fusion)
        finally:
            DistributedDataParallel._grad_ready = original
        tokens, labels = H.batch(0)
        with chunk.no_sync():
            chunk(tokens[:2], labels=labels[:2]).sum().backward()
        chunk(tokens[2:4], labels=labels[2:4]).sum().backward()
        chunk.finish_grad_sync()
        grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
        assert all(p.grad is None for p in model.parameters())
        return grads, hooked
    finally:
        state.destroy_model_parallel()


def _single_rank():
    return {(fusion, tied): _gradients(fusion, tied) for fusion in (False, True) for tied in (False, True)}


@pytest.fixture(scope="module")
def single_rank():
    return run_distributed(_single_rank, 1, timeout=120)[0]


@pytest.mark.parametrize("tied", [False, True])
def test_fusion_bypasses_autograd_for_the_linear_weights_only(single_rank, tied):
    plain, plain_hooked = single_rank[False, tied]
    fused, fused_hooked = single_rank[True, tied]
    assert plain_hooked == set(plain)
    linear = {n for n in plain if n.endswith(("wqkv.weight", "wo.weight", "w13.weight", "w2.weight"))}
    assert len(linear) == 8
    # a tied head adds into the embedding's gradient through autograd, as the embedding does
    expected = set(plain) - linear - (set() if tied else {"output.weight"})
    assert fused_hooked == expected
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def _reported_twice():
    state.initialize_model_parallel(1, 1)
    try:
        model = H.LlamaModel(H.config(num_layers=1))
        DistributedDataParallel(model, bucket_size=1, gradient_accumulation_fusion=True)  # a bucket each
        weight = model.layers["0"].attention.wo.weight
        weight.signal_main_grad_added()
        try:
            weight.signal_main_grad_added()
        except RuntimeError as error:
            return str(error)
        return "no error"
    finally:
        state.destroy_model_parallel()


def test_a_gradient_reported_twice_is_an_error_not_an_early_reduction():
    # what a tied weight fused into main_grad would do (its bucket reduced before its last gradient)
    message = run_distributed(_reported_twice, 1, timeout=60)[0]
    assert "reported twice in one backward" in message
