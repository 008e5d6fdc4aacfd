"""``overlap_param_gather`` / ``overlap_grad_reduce`` change when collectives are waited for, never
what is computed: a tiny LLaMA trained with ZeRO-1 over DP 2 (and TP 2 x DP 2) gives bit-identical
losses and parameters with the overlaps on and off. With the overlap the output layer's gather is
still in flight when the last layer starts (it is waited for at the final norm), and the
parameters are views of their bucket's buffer, which the gathers fill in place."""
import pytest
import torch

from megallama.distributed import (DistributedDataParallel, OptimizerConfig, build_optimizer, finalize_model_grads,
                                   global_mean_loss)
from megallama.parallel import state
from megallama.pipeline import ActivationShape, build_model_chunks, get_forward_backward_func
from megallama.training.forward_step import llama_forward_step
from tests.distributed_utils import run_distributed
from tests.pipeline import harness as H

STEPS = 3
MICRO_BATCH = 2
# Overlap variants: (overlap_grad_reduce, overlap_param_gather); the first is the reference.
VARIANTS = [(False, False), (True, False), (False, True), (True, True)]


def _train(cfg, full, tp, overlap_grad_reduce, overlap_param_gather):
    """Losses, the number of parameter gathers still in flight after each step, final parameters."""
    state.initialize_model_parallel(tp, 1)
    try:
        dp, dp_rank = state.get_data_parallel_world_size(), state.get_data_parallel_rank()
        model = build_model_chunks(lambda spec: H.make_stage(cfg, spec, full), cfg)[0]
        # Small buckets: many gathers, one of them the output layer's alone.
        chunk = DistributedDataParallel(model, use_distributed_optimizer=True, bucket_size=1500,
                                        overlap_grad_reduce=overlap_grad_reduce,
                                        overlap_param_gather=overlap_param_gather)
        config = OptimizerConfig(use_distributed_optimizer=True, overlap_grad_reduce=overlap_grad_reduce,
                                 overlap_param_gather=overlap_param_gather, **H.OPT)
        optimizer = build_optimizer(config, [chunk])
        for bucket in chunk.buckets:
            for p in bucket.params:
                assert p.untyped_storage().data_ptr() == bucket.param_data.untyped_storage().data_ptr()
        output_bucket = next(b for b in chunk.buckets if any(p is model.output.weight for p in b.params))
        # (at TP=2 the output layer's shard shares its bucket with the last layer's parameters)
        output_alone = all(p is model.output.weight or p is model.norm.weight for p in output_bucket.params)
        output_in_flight = []  # at the start of the last layer, each forward
        last_layer = list(model.layers.values())[-1]
        last_layer.register_forward_pre_hook(lambda *_: output_in_flight.append(output_bucket.param_gather is not None))
        per_rank = H.GLOBAL_BATCH // dp
        losses, in_flight, output_late = [], [], []
        for step in range(STEPS):
            output_in_flight.clear()
            tokens, labels = H.batch(step)
            mine = [(tokens[i:i + MICRO_BATCH], labels[i:i + MICRO_BATCH])
                    for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank, MICRO_BATCH)]
            optimizer.zero_grad()
            step_losses = get_forward_backward_func(1, None)(
                llama_forward_step, iter(mine), [chunk], per_rank // MICRO_BATCH,
                ActivationShape(H.SEQ, MICRO_BATCH, cfg.hidden_size, torch.float32))
            finalize_model_grads([chunk], step_losses)
            applied, _ = optimizer.step()
            assert applied
            losses.append(float(global_mean_loss(step_losses)))
            output_late.append(output_in_flight[0])
            in_flight.append(sum(b.param_gather is not None for b in chunk.buckets))
        # An evaluation forward right after a step waits for the gathers through the hooks.
        tokens, labels = H.batch(STEPS)
        with torch.no_grad():
            eval_loss = float(model(tokens[:MICRO_BATCH], labels=labels[:MICRO_BATCH]).mean())
        optimizer.step()  # leaves gathers in flight again (with the overlap)
        optimizer.finish_param_sync()
        assert all(b.param_gather is None for b in chunk.buckets)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        return {"losses": losses, "eval_loss": eval_loss, "in_flight": in_flight, "output_late": output_late,
                "output_alone": output_alone,
                "num_buckets": len(chunk.buckets), "params": params}
    finally:
        state.destroy_model_parallel()


def _compare_variants(tp):
    cfg = H.config(num_layers=4)
    full = H.initial_state(cfg)
    return [_train(cfg, full, tp, *variant) for variant in VARIANTS]


def _assert_identical(per_rank):
    for runs in per_rank:
        reference = runs[0]
        for variant, run in zip(VARIANTS, runs):
            assert run["losses"] == reference["losses"], variant
            assert run["eval_loss"] == reference["eval_loss"], variant
            for name, p in run["params"].items():
                assert torch.equal(p, reference["params"][name]), (variant, name)
            _, overlap_param_gather = variant
            # Not vacuous: with the overlap every bucket's gather is left to the next forward.
            expected = run["num_buckets"] if overlap_param_gather else 0
            assert run["in_flight"] == [expected] * STEPS, variant
            # The first forward has nothing in flight; each later one has the output layer's gather.
            late = overlap_param_gather and run["output_alone"]
            assert run["output_late"] == [False] + [late] * (STEPS - 1), variant
        assert reference["num_buckets"] > 3


def test_overlap_is_bit_identical_zero1_dp2():
    per_rank = run_distributed(_compare_variants, 2, 1, timeout=240.0)
    _assert_identical(per_rank)
    assert all(run["output_alone"] for runs in per_rank for run in runs)


def test_overlap_is_bit_identical_tp2_dp2():
    _assert_identical(run_distributed(_compare_variants, 4, 2, timeout=300.0))


def test_overlap_param_gather_needs_the_distributed_optimizer():
    with pytest.raises(ValueError, match="overlap_param_gather needs the distributed optimizer"):
        DistributedDataParallel(torch.nn.Linear(2, 2), data_parallel_group=object(), overlap_param_gather=True)
    with pytest.raises(ValueError, match="overlap_param_gather needs the distributed optimizer"):
        OptimizerConfig(overlap_param_gather=True)


def _mismatched_overlap():
    chunk = DistributedDataParallel(torch.nn.Linear(2, 2), use_distributed_optimizer=True, overlap_param_gather=True)
    with pytest.raises(ValueError, match=r"overlap_param_gather=\.\.\.\) must match"):
        build_optimizer(OptimizerConfig(use_distributed_optimizer=True), [chunk])


def test_optimizer_config_must_match_the_chunks():
    run_distributed(_mismatched_overlap, 1)


def _mixed_dtype_bucket():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16))
    with pytest.raises(ValueError, match="a gradient bucket mixes parameter dtypes"):
        DistributedDataParallel(module, use_distributed_optimizer=True)


def test_a_bucket_of_two_dtypes_is_refused_by_the_distributed_optimizer():
    run_distributed(_mixed_dtype_bucket, 1)
