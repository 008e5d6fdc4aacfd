"""AdamW on fp32 main parameters, optionally sharded over data parallelism (ZeRO-1).

Both optimizers work on model chunks wrapped in
:class:`~megallama.distributed.data_parallel.DistributedDataParallel`, whose fp32 ``main_grad``
buffers hold the reduced gradients. ``step()`` computes the global gradient norm (each parameter
counted once over TP/PP/DP), skips the update when it is NaN/inf, clips, runs AdamW on the fp32
main parameters and writes them back to the model parameters (bf16 or fp32).

* :class:`MixedPrecisionOptimizer`: every DP rank holds all main parameters and AdamW state.
* :class:`DistributedOptimizer`: DP rank ``i`` holds the main parameters and AdamW state of the
  ``i``-th slice of every gradient bucket only (the slice it received by reduce-scatter); after its
  update the new parameters are all-gathered over DP.

``state_dict()`` is layout-free: per parameter name, the full (DP-gathered) fp32 main parameter and
AdamW moments with the shape of this rank's model parameter, so a checkpoint can be resharded to
another DP size (and, by slicing as the model's weights, another TP/PP layout).
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megallama.distributed.clip_grads import clip_grads_, global_grad_norm, grads_for_norm, is_finite
from megallama.distributed.data_parallel import DistributedDataParallel, all_gather_single

_STATE_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class OptimizerConfig:
    """AdamW hyperparameters (the LLaMA paper's defaults) and the sharding choice."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping (the norm is still computed and checked)
    use_distributed_optimizer: bool = False


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices, not to 1-D parameters (norm weights), as in Megatron."""
    return param.dim() >= 2


def default_adamw(param_groups: List[dict], config: OptimizerConfig) -> torch.optim.Optimizer:
    """torch's fused AdamW (CPU and CUDA), falling back to the foreach one."""
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                  weight_decay=config.weight_decay)
    try:
        return torch.optim.AdamW(param_groups, fused=True, **kwargs)
    except RuntimeError:
        return torch.optim.AdamW(param_groups, **kwargs)


def build_optimizer(config: OptimizerConfig, model_chunks: List[DistributedDataParallel],
                    optimizer_factory: Optional[Callable] = None):
    """The optimizer ``config`` asks for over this rank's DDP-wrapped model chunks."""
    for chunk in model_chunks:
        if not isinstance(chunk, DistributedDataParallel):
            raise TypeError("build_optimizer needs model chunks wrapped in DistributedDataParallel")
        if chunk.use_distributed_optimizer != config.use_distributed_optimizer:
            raise ValueError("DistributedDataParallel(use_distributed_optimizer=...) must match "
                             "OptimizerConfig.use_distributed_optimizer")
    cls = DistributedOptimizer if config.use_distributed_optimizer else MixedPrecisionOptimizer
    return cls(config, model_chunks, optimizer_factory or default_adamw)


class _Entry:
    """One fp32 main tensor: a whole model parameter, or (ZeRO-1) the flat slice [lo, hi) of it.

    ``optimizer.entries`` (name, param, main, grad, lo, hi) is read by the sharded checkpoint code
    (megallama.training.sharded_state), which saves each rank's slices without gathering.
    """

    def __init__(self, name, param, main, grad, lo, hi):
        self.name, self.param, self.main, self.grad, self.lo, self.hi = name, param, main, grad, lo, hi


class _OptimizerBase:
    sharded = False

    def __init__(self, config: OptimizerConfig, model_chunks: List[DistributedDataParallel],
                 optimizer_factory: Callable):
        self.config = config
        self.model_chunks = list(model_chunks)
        self.names: Dict[torch.nn.Parameter, str] = {}
        for chunk in self.model_chunks:
            for name, p in chunk.module.named_parameters():
                if name in self.names.values():
                    raise ValueError(f"parameter name {name!r} appears in two model chunks; "
                                     "chunks must name layers by their global index")
                self.names[p] = name
        self.entries: List[_Entry] = self._make_entries()
        # Always both groups, even empty (a stage or a ZeRO-1 slice may hold only one kind), so
        # that a saved state's groups line up with any layout's.
        groups = [{"params": [e.main for e in self.entries if decays(e.name, e.param)]},
                  {"params": [e.main for e in self.entries if not decays(e.name, e.param)],
                   "weight_decay": 0.0}]
        self.optimizer = optimizer_factory(groups, config)

    @property
    def param_groups(self):
        """The inner optimizer's groups (a learning-rate scheduler sets ``group['lr']``)."""
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        for e in self.entries:
            e.main.grad = None

    @torch.no_grad()
    def step(self) -> Tuple[bool, torch.Tensor]:
        """One update; returns (applied, grad_norm). Not applied when the norm is NaN/inf."""
        for e in self.entries:
            e.main.grad = e.grad
        dp_group = self.model_chunks[0].data_parallel_group if self.sharded else None
        norm = global_grad_norm(grads_for_norm((e.param, e.grad) for e in self.entries), dp_group)
        applied = is_finite(norm)
        if applied:
            if self.config.clip_grad > 0:
                clip_grads_([e.grad for e in self.entries], self.config.clip_grad, norm)
            self.optimizer.step()
            self._write_back()
        # Unlink the buffer views: a later backward must not accumulate into them through .grad.
        for e in self.entries:
            e.main.grad = None
        return applied, norm

    # --- layout-free state ------------------------------------------------------------------------

    def _step_count(self) -> int:
        for e in self.entries:
            st = self.optimizer.state.get(e.main)
            if st:
                return int(float(st["step"]))
        return 0

    def _moment(self, e: _Entry, key: str) -> torch.Tensor:
        st = self.optimizer.state.get(e.main)
        return st[key] if st else torch.zeros_like(e.main)

    def _set_state(self, e: _Entry, step: int, moments: Dict[str, torch.Tensor]) -> None:
        group = next(g for g in self.optimizer.param_groups if any(t is e.main for t in g["params"]))
        on_device = group.get("fused") or group.get("capturable")
        step_t = torch.tensor(float(step), dtype=torch.float32,
                              device=e.main.device if on_device else "cpu")
        self.optimizer.state[e.main] = {"step": step_t, **{k: v.clone() for k, v in moments.items()}}

    def state_dict(self) -> dict:
        """{"step", "param_groups" (hyperparameters), "params": {name: {main_param, exp_avg, exp_avg_sq}}}."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        return {"step": self._step_count(), "param_groups": groups, "params": self._full_tensors()}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.names.values()) - set(state["params"]))
        if missing:
            raise KeyError(f"optimizer state has no entry for parameters {missing[:5]}"
                           f"{' …' if len(missing) > 5 else ''}")
        if len(state["param_groups"]) != len(self.optimizer.param_groups):
            raise ValueError("optimizer state has a different number of parameter groups")
        for group, saved in zip(self.optimizer.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k in group and k != "params"})
        for e in self.entries:
            full = state["params"][e.name]
            if tuple(full["main_param"].shape) != tuple(e.param.shape):
                raise ValueError(f"optimizer state for {e.name} has shape {tuple(full['main_param'].shape)}, "
                                 f"the model parameter {tuple(e.param.shape)} (reshard it first)")
            e.main.data.copy_(full["main_param"].reshape(-1)[e.lo:e.hi].view_as(e.main))
            if state["step"] > 0:
                self._set_state(e, state["step"], {k: full[k].reshape(-1)[e.lo:e.hi].view_as(e.main)
                                                   .to(e.main.device, torch.float32)
                                                   for k in _STATE_KEYS})
        self._write_back()


class MixedPrecisionOptimizer(_OptimizerBase):
    """Every DP rank updates all parameters (fp32 main copies for low-precision parameters)."""

    def _make_entries(self) -> List[_Entry]:
        entries = []
        for chunk in self.model_chunks:
            for p in chunk.module.parameters():
                if not p.requires_grad:
                    continue
                # fp32 parameters are their own main copy; bf16/fp16 ones get an fp32 master.
                main = p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float().clone())
                entries.append(_Entry(self.names[p], p, main, p.main_grad, 0, p.numel()))
        return entries

    def _write_back(self) -> None:
        for e in self.entries:
            if e.main is not e.param:
                e.param.data.copy_(e.main.data)

    def _full_tensors(self) -> dict:
        out = {}
        for e in self.entries:
            out[e.name] = {"main_param": e.main.detach().float().clone(),
                           **{k: self._moment(e, k).detach().clone() for k in _STATE_KEYS}}
        return out


class DistributedOptimizer(_OptimizerBase):
    """ZeRO-1: fp32 main parameters and AdamW state sharded over DP along the gradient buckets."""

    sharded = True

    def _make_entries(self) -> List[_Entry]:
        entries = []
        for chunk in self.model_chunks:
            for bucket in chunk.buckets:
                dtypes = {p.dtype for p in bucket.params}
                if len(dtypes) > 1:
                    raise ValueError(f"a gradient bucket mixes parameter dtypes {dtypes}; the "
                                     "distributed optimizer all-gathers a bucket in one dtype")
                s_lo, s_hi = chunk.shard_range(bucket)
                for p in bucket.params:
                    p_lo, p_hi = chunk.param_range[p]
                    lo, hi = max(p_lo, s_lo), min(p_hi, s_hi)
                    if lo >= hi:
                        continue
                    main = torch.nn.Parameter(p.detach().reshape(-1)[lo - p_lo:hi - p_lo].float().clone())
                    entries.append(_Entry(self.names[p], p, main, chunk.grad_buffer[lo:hi],
                                          lo - p_lo, hi - p_lo))
        return entries

    def _gather_buckets(self, shard_values: Callable[[_Entry], torch.Tensor], dtype=None):
        """All-gather, bucket by bucket, a per-entry value; yields (param, flat full tensor)."""
        by_param = {}
        for e in self.entries:
            by_param.setdefault(e.param, []).append(e)
        for chunk in self.model_chunks:
            for bucket in chunk.buckets:
                s_lo, s_hi = chunk.shard_range(bucket)
                bucket_dtype = dtype or bucket.params[0].dtype
                shard = torch.zeros(s_hi - s_lo, dtype=bucket_dtype, device=chunk.grad_buffer.device)
                for p in bucket.params:
                    p_lo, _ = chunk.param_range[p]
                    for e in by_param.get(p, []):
                        shard[p_lo + e.lo - s_lo:p_lo + e.hi - s_lo] = shard_values(e)
                full = torch.empty(bucket.padded, dtype=bucket_dtype, device=shard.device)
                if chunk.dp_size > 1:
                    all_gather_single(full, shard, group=chunk.data_parallel_group)
                else:
                    full.copy_(shard)
                for p in bucket.params:
                    p_lo, p_hi = chunk.param_range[p]
                    yield p, full[p_lo - bucket.start:p_hi - bucket.start]

    def _write_back(self) -> None:
        for p, flat in self._gather_buckets(lambda e: e.main.detach()):
            p.data.copy_(flat.view_as(p))

    def _full_tensors(self) -> dict:
        out = {}
        for key, value in (("main_param", lambda e: e.main.detach()),
                           ("exp_avg", lambda e: self._moment(e, "exp_avg")),
                           ("exp_avg_sq", lambda e: self._moment(e, "exp_avg_sq"))):
            for p, flat in self._gather_buckets(value, dtype=torch.float32):
                out.setdefault(self.names[p], {})[key] = flat.view_as(p).clone()
        return out
