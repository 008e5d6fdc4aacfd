"""A tiny LLaMA trained for a few steps serially and under (TP, PP, DP) layouts, for equality tests.

The serial run is the reference: the whole model, the whole global batch, mean token loss,
``torch.nn.utils.clip_grad_norm_`` and ``torch.optim.AdamW``. The parallel run goes through the
stages, schedules, DDP buckets and optimizers under test, from the same initial weights and data.
"""
import dataclasses

import torch

from megallama.config import LlamaConfig
from megallama.distributed import (DistributedDataParallel, OptimizerConfig, build_optimizer,
                                   finalize_model_grads, global_mean_loss)
from megallama.distributed.optimizer import default_adamw
from megallama.model import LlamaModel
from megallama import parallel
from megallama.parallel import state
from megallama.pipeline import ActivationShape, build_model_chunks, get_forward_backward_func
from megallama.training.forward_step import llama_forward_step

SEQ = 16
GLOBAL_BATCH = 8
VOCAB = 64
OPT = dict(lr=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-5, clip_grad=0.5)


def config(**overrides) -> LlamaConfig:
    kw = dict(num_layers=8, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
              vocab_size=VOCAB, max_position_embeddings=SEQ)
    kw.update(overrides)
    return LlamaConfig(**kw)


def initial_state(cfg: LlamaConfig) -> dict:
    """The serial model's initial weights (built before any model-parallel groups exist)."""
    if state.model_parallel_is_initialized():
        raise RuntimeError("initial_state must be taken before initialize_model_parallel")
    torch.manual_seed(1234)
    return LlamaModel(dataclasses.replace(cfg, sequence_parallel=False)).state_dict()


def batch(step: int):
    """Global batch ``step``: (tokens, labels) ``[GLOBAL_BATCH, SEQ]``."""
    g = torch.Generator().manual_seed(100 + step)
    seq = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def serial_run(cfg: LlamaConfig, steps: int):
    """Returns (losses, grad_norms, final state dict) of the reference run."""
    model = LlamaModel(cfg)
    model.load_state_dict(initial_state(cfg))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = default_adamw([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
                        OptimizerConfig(**OPT))
    losses, norms = [], []
    for step in range(steps):
        tokens, labels = batch(step)
        per_token = model(tokens, labels=labels)
        opt.zero_grad()
        # The gradient of the mean token loss, taken as the schedules do: sum, then divide.
        per_token.sum().backward()
        for p in model.parameters():
            p.grad /= per_token.numel()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["clip_grad"])))
        opt.step()
        losses.append(float(per_token.detach().mean()))
    return losses, norms, {k: v.clone() for k, v in model.state_dict().items()}


def make_stage(cfg: LlamaConfig, spec, full: dict) -> LlamaModel:
    """One stage's model holding this TP rank's shard of the full weights ``full``."""
    m = LlamaModel(cfg, pre_process=spec.pre_process, post_process=spec.post_process,
                   layer_ids=spec.layer_ids)
    own = dict(m.named_parameters(remove_duplicate=False))  # a tied head's name too
    m.load_state_dict({k: parallel.shard_like(own[k], v) for k, v in full.items() if k in own})
    return m


def parallel_run(cfg: LlamaConfig, tp: int, pp: int, vp, micro_batch: int, distributed_opt: bool,
                 steps: int, bucket_size: int = 3000, inject_inf_at=None, forward_step=None,
                 gradient_accumulation_fusion: bool = False, overlap_p2p_comm: bool = True):
    """Train on this rank's share; returns {"losses", "norms", "applied", "params", "grads"} (the
    last step's local main gradients).

    ``inject_inf_at=(step, pp_rank)`` puts an inf into one gradient of that stage at that step.
    """
    full = initial_state(cfg)
    state.initialize_model_parallel(tp, pp, vp)
    try:
        dp, dp_rank = state.get_data_parallel_world_size(), state.get_data_parallel_rank()

        chunks = [DistributedDataParallel(m, use_distributed_optimizer=distributed_opt, bucket_size=bucket_size,
                                          gradient_accumulation_fusion=gradient_accumulation_fusion)
                  for m in build_model_chunks(lambda spec: make_stage(cfg, spec, full), cfg, vp)]
        optimizer = build_optimizer(OptimizerConfig(use_distributed_optimizer=distributed_opt, **OPT),
                                    chunks)
        fwd_bwd = get_forward_backward_func(pp, vp, overlap_p2p_comm)
        per_rank = GLOBAL_BATCH // dp
        num_micro = per_rank // micro_batch
        out = {"losses": [], "norms": [], "applied": []}
        for step in range(steps):
            tokens, labels = batch(step)
            mine = [(tokens[i:i + micro_batch], labels[i:i + micro_batch])
                    for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank, micro_batch)]
            data = [iter(mine) for _ in chunks] if vp else iter(mine)
            optimizer.zero_grad()
            shape = ActivationShape(SEQ, micro_batch, cfg.hidden_size, torch.float32, cfg.sequence_parallel)
            losses = fwd_bwd(forward_step or llama_forward_step, data, chunks, num_micro, shape)
            finalize_model_grads(chunks, losses)
            if inject_inf_at is not None and inject_inf_at == (step, state.get_pipeline_model_parallel_rank()):
                chunks[0].grad_buffer[0] = float("inf")
            applied, norm = optimizer.step()
            mean = global_mean_loss(losses)
            out["losses"].append(float(mean) if mean is not None else None)
            out["norms"].append(float(norm))
            out["applied"].append(applied)
        # Full tensors (gathered over TP), comparable with the serial model's.
        out["params"] = {k: parallel.gather_like(p, p.detach()).clone()
                         for c in chunks for k, p in c.module.named_parameters(remove_duplicate=False)}
        out["grads"] = {k: p.main_grad.clone() for c in chunks
                        for k, p in c.module.named_parameters(remove_duplicate=False)}
        out["tp_rank"] = state.get_tensor_model_parallel_rank()
        out["dp_rank"] = dp_rank
        return out
    finally:
        state.destroy_model_parallel()


def check_against_serial(results, serial, rtol=1e-5, atol=1e-6):
    """Every rank's losses (last stage), grad norms and parameters equal the serial run's."""
    losses, norms, params = serial
    seen = set()
    for rank, r in enumerate(results):
        assert all(r["applied"]), f"rank {rank}: a step was skipped"
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(norms), rtol=rtol, atol=atol,
                                   msg=lambda m: f"rank {rank} grad norms: {m}")
        if r["losses"][0] is not None:
            torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(losses), rtol=rtol,
                                       atol=atol, msg=lambda m: f"rank {rank} losses: {m}")
        for name, value in r["params"].items():
            torch.testing.assert_close(value, params[name], rtol=rtol, atol=atol,
                                       msg=lambda m: f"rank {rank} parameter {name}: {m}")
            seen.add(name)
    assert seen == set(params), f"parameters never checked: {sorted(set(params) - seen)}"
    assert any(r["losses"][0] is not None for r in results), "no rank reported losses"


def check_identical(results, reference):
    """Every rank's losses, grad norms, last gradients and parameters equal ``reference``'s bit for bit."""
    for rank, (r, ref) in enumerate(zip(results, reference, strict=True)):
        assert (r["losses"], r["norms"], r["applied"]) == (ref["losses"], ref["norms"], ref["applied"]), rank
        for what in ("grads", "params"):
            assert r[what].keys() == ref[what].keys(), (rank, what)
            for name, value in r[what].items():
                assert torch.equal(value, ref[what][name]), f"rank {rank}: {what} of {name} differ"


def parallel_eval(cfg: LlamaConfig, pp: int, vp, micro_batch: int, overlap_p2p_comm: bool = True):
    """forward_only over global batch 0 at the initial weights; the global mean loss (last stage)."""
    full = initial_state(cfg)
    state.initialize_model_parallel(1, pp, vp)
    try:
        chunks = [DistributedDataParallel(m)
                  for m in build_model_chunks(lambda spec: make_stage(cfg, spec, full), cfg, vp)]
        tokens, labels = batch(0)
        mine = [(tokens[i:i + micro_batch], labels[i:i + micro_batch])
                for i in range(0, GLOBAL_BATCH, micro_batch)]
        data = [iter(mine) for _ in chunks] if vp else iter(mine)
        losses = get_forward_backward_func(pp, vp, overlap_p2p_comm)(llama_forward_step, data, chunks, len(mine),
                                                   ActivationShape(SEQ, micro_batch, cfg.hidden_size),
                                                   forward_only=True)
        assert all(p.main_grad.abs().sum() == 0 for c in chunks for p in c.module.parameters())
        mean = global_mean_loss(losses)
        return None if mean is None else float(mean)
    finally:
        state.destroy_model_parallel()


def serial_eval(cfg: LlamaConfig) -> float:
    model = LlamaModel(cfg)
    model.load_state_dict(initial_state(cfg))
    tokens, labels = batch(0)
    with torch.no_grad():
        return float(model(tokens, labels=labels).mean())
