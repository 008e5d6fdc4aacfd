"""AdamW on fp32 main parameters, optionally sharded over data parallelism (ZeRO-1).

Both optimizers work on model chunks wrapped in
:class:`~megallama.distributed.data_parallel.DistributedDataParallel`, whose fp32 ``main_grad``
buffers hold the reduced gradients. ``step()`` computes the global gradient norm (each parameter
counted once over TP/PP/DP), skips the update when it is NaN/inf, clips, runs AdamW on the fp32
main parameters and writes them back to the model parameters (bf16 or fp32). With torch's fused
AdamW (the default) all of that stays on the device, the skip included (AdamW's ``found_inf``), so
a step never waits for the device; another inner optimizer reads the norm on the host to decide.

* :class:`MixedPrecisionOptimizer`: every DP rank holds all main parameters and AdamW state.
* :class:`DistributedOptimizer`: DP rank ``i`` holds the main parameters and AdamW state of the
  ``i``-th slice of every gradient bucket only (the slice it received by reduce-scatter); after its
  update the new parameters are all-gathered over DP (left in flight until the next forward needs
  them when the DDP chunks have ``overlap_param_gather``: call :meth:`finish_param_sync` before
  reading the model's parameters outside a forward).

Checkpoints read and write the optimizer state through ``entries`` (see :class:`_Entry`).
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from megallama.distributed.clip_grads import clip_grads_, global_grad_norm, grads_for_norm, is_finite
from megallama.distributed.data_parallel import DistributedDataParallel


@dataclass
class OptimizerConfig:
    """AdamW hyperparameters (the LLaMA paper's defaults), the sharding choice, and when the DDP
    chunks wait for their collectives (``DistributedDataParallel``'s arguments of the same names,
    which :func:`build_optimizer` checks the chunks were built with)."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping (the norm is still computed and checked)
    # Megatron's --decoupled-lr/--decoupled-min-lr: the embedding's and output layer's own peak lr
    # and floor (None: --lr's schedule; a None floor with a decoupled lr is the schedule's --min-lr).
    decoupled_lr: Optional[float] = None
    decoupled_min_lr: Optional[float] = None
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = False
    gradient_accumulation_fusion: bool = True  # a DDP option (weight_grad), kept with the others

    def __post_init__(self):
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise ValueError("overlap_param_gather needs the distributed optimizer (use_distributed_optimizer): "
                             "only it all-gathers parameters after the step")


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices, not to 1-D parameters (norm weights), as in Megatron."""
    return param.dim() >= 2


def is_embedding_or_output(name: str) -> bool:
    """Megatron's ``is_embedding_or_output_parameter``: the input embedding and the output layer's
    weight, the latter also as a tied head or a last pipeline stage's copy of the embedding."""
    return name in ("tok_embeddings.weight", "output.weight")


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
        for option in ("use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather"):
            if getattr(chunk, option) != getattr(config, option):
                raise ValueError(f"DistributedDataParallel({option}=...) must match OptimizerConfig.{option}")
    cls = DistributedOptimizer if config.use_distributed_optimizer else MixedPrecisionOptimizer
    return cls(config, model_chunks, optimizer_factory or default_adamw)


class _Entry:
    """One fp32 main tensor: a whole model parameter, or (ZeRO-1) the flat slice [lo, hi) of it.

    ``optimizer.entries`` (name, param, main, grad, lo, hi) is read by the sharded checkpoint code
    (megallama.checkpoint.sharded), which saves each rank's slices without gathering.
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
        self.optimizer = optimizer_factory(self._param_groups(), config)

    def _param_groups(self) -> List[dict]:
        """Decayed matrices, undecayed 1-D parameters and, with a decoupled lr, the embedding and
        output weights (matrices: decayed) with their own ``max_lr``/``min_lr``, which
        ``LRSchedule.apply`` reads as Megatron's scheduler does (a missing ``min_lr``: the schedule's).

        The groups follow the config alone: every rank has them all, some maybe empty (a stage or a
        ZeRO-1 slice may hold only some kinds). Checkpoints store the AdamW state per parameter, not
        per group, so a run resumes with or without a decoupled lr whichever way it was saved.
        """
        c = self.config
        decoupled = c.decoupled_lr is not None

        def own(e: _Entry) -> bool:
            return decoupled and is_embedding_or_output(e.name)

        groups = [{"params": [e.main for e in self.entries if decays(e.name, e.param) and not own(e)]},
                  {"params": [e.main for e in self.entries if not decays(e.name, e.param) and not own(e)],
                   "weight_decay": 0.0}]
        if decoupled:
            group = {"params": [e.main for e in self.entries if own(e)], "max_lr": c.decoupled_lr}
            if c.decoupled_min_lr is not None:
                group["min_lr"] = c.decoupled_min_lr
            groups.append(group)
        return groups

    @property
    def param_groups(self):
        """The inner optimizer's groups (a learning-rate scheduler sets ``group['lr']``)."""
        return self.optimizer.param_groups

    def finish_param_sync(self) -> None:
        """Complete the parameter all-gathers still in flight (``overlap_param_gather``)."""
        for chunk in self.model_chunks:
            chunk.finish_param_sync()

    def zero_grad(self) -> None:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        for e in self.entries:
            e.main.grad = None

    @property
    def skips_on_device(self) -> bool:
        """Whether the inner optimizer can skip a step on a device flag: torch's fused Adam/AdamW
        read ``found_inf`` (as GradScaler sets it) and undo their step count when it is 1."""
        return isinstance(self.optimizer, torch.optim.Adam) and all(g.get("fused") for g in self.param_groups)

    @torch.no_grad()
    def step(self, found_inf: Optional[torch.Tensor] = None) -> Tuple[Union[bool, torch.Tensor], torch.Tensor]:
        """One update; returns (applied, grad_norm). Not applied when the norm is NaN/inf, nor when
        ``found_inf`` (a 0-dim device tensor from the caller, e.g. a non-finite loss) is nonzero.

        With :attr:`skips_on_device`, ``applied`` is a 0-dim bool device tensor and nothing here
        reads the device; otherwise it is a bool read on the host.
        """
        for e in self.entries:
            e.main.grad = e.grad
        dp_group = self.model_chunks[0].data_parallel_group if self.sharded else None
        norm = global_grad_norm(grads_for_norm((e.param, e.grad, e.lo) for e in self.entries), dp_group)
        on_device = self.skips_on_device
        if on_device:
            applied = torch.isfinite(norm) if found_inf is None else torch.isfinite(norm) & (found_inf == 0)
            self.optimizer.found_inf = (~applied).float()  # the fused step skips itself when it is 1
        else:
            applied = is_finite(norm) and (found_inf is None or not bool(found_inf))
        if on_device or applied:
            if self.config.clip_grad > 0:
                clip_grads_([e.grad for e in self.entries], self.config.clip_grad, norm)
            try:
                self.optimizer.step()
            finally:
                self.optimizer.__dict__.pop("found_inf", None)
            self._write_back()  # a skipped step writes back the unchanged main parameters
        # Unlink the buffer views: a later backward must not accumulate into them through .grad.
        for e in self.entries:
            e.main.grad = None
        return applied, norm


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


class DistributedOptimizer(_OptimizerBase):
    """ZeRO-1: fp32 main parameters and AdamW state sharded over DP along the gradient buckets."""

    sharded = True

    def _make_entries(self) -> List[_Entry]:
        entries = []
        for chunk in self.model_chunks:
            for bucket in chunk.buckets:
                s_lo, s_hi = chunk.shard_range(bucket)
                for p in bucket.params:
                    p_lo, p_hi = chunk.param_range[p]
                    lo, hi = max(p_lo, s_lo), min(p_hi, s_hi)
                    if lo >= hi:
                        continue
                    main = torch.nn.Parameter(p.detach().reshape(-1)[lo - p_lo:hi - p_lo].float().clone())
                    entries.append(_Entry(self.names[p], p, main, chunk.grad_buffer[lo:hi],
                                          lo - p_lo, hi - p_lo))
        self._entries_of: Dict[torch.nn.Parameter, List[_Entry]] = {}
        for e in entries:
            self._entries_of.setdefault(e.param, []).append(e)
        return entries

    def _write_back(self) -> None:
        """Each bucket's main parameters, in the model's dtype, into the parameters this rank owns
        (its slice of the bucket's buffer); then the all-gather of the slices."""
        for chunk in self.model_chunks:
            for bucket in chunk.param_gather_order:
                chunk.wait_param_gather(bucket)  # one still in flight (nothing read it) writes the same memory
                for p in bucket.params:
                    for e in self._entries_of.get(p, []):
                        p.detach().view(-1)[e.lo:e.hi].copy_(e.main.detach())
                chunk.start_param_gather(bucket)
