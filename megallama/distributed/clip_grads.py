"""Global gradient norm over TP, PP and DP, counting each parameter once, and clipping by it.

A parameter's gradient enters the norm on exactly one rank of the model:

* TP: tensor-parallel shards (a ``tp_split``, see ``megallama.parallel.split``) are disjoint and all count;
  a parameter replicated over TP (norm weights) counts on TP rank 0 only.
* Shared parameters (``param.shared = True``, a copy of one parameter living on several pipeline
  stages) count on the first pipeline stage only.
* DP: without the distributed optimizer every DP rank holds the same reduced gradients, so the
  norm is not summed over DP; with it each rank holds a disjoint slice and the squares are summed
  over the DP group.

The squares are summed over TP and PP groups, so every rank gets the same norm. A NaN or inf norm
is reported to the caller (which must skip the step), never silently clipped.
"""
from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megallama.parallel.split import is_tensor_parallel, tp_split_of


def counts_for_norm(param: torch.nn.Parameter, tp_rank: int, pp_rank: int) -> bool:
    """Whether this rank's copy of ``param`` is the one counted in the global norm."""
    if getattr(param, "shared", False) and pp_rank != 0:
        return False
    return is_tensor_parallel(param) or tp_rank == 0


def global_grad_norm(grads: Iterable[torch.Tensor],
                     sharded_over_dp: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """L2 norm (fp32 scalar) of the given gradients, summed over TP, PP (and DP if sharded).

    ``grads`` must already be filtered with :func:`counts_for_norm`.
    """
    from megallama.parallel import state

    grads = list(grads)
    if grads:
        squares = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).pow(2).sum()
    else:
        squares = torch.zeros((), dtype=torch.float32, device=_device())
    # Each group sum below is over ranks holding different parameters (or different slices).
    if sharded_over_dp is not None and dist.get_world_size(sharded_over_dp) > 1:
        dist.all_reduce(squares, group=sharded_over_dp)
    if state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(squares, group=state.get_tensor_model_parallel_group())
    if state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(squares, group=state.get_pipeline_model_parallel_group())
    return squares.sqrt()


def clip_grads_(grads: Sequence[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale ``grads`` in place so their global norm is at most ``max_norm``, without reading the
    norm on the host.

    Same coefficient as ``torch.nn.utils.clip_grad_norm_``: ``max_norm / (norm + 1e-6)``, capped at 1,
    computed in float64 and rounded to float32 as ``_foreach_mul_`` rounds a Python scalar for
    float32 tensors; a coefficient capped at exactly 1.0 leaves every gradient unchanged.
    """
    if grads:
        coeff = (float(max_norm) / (total_norm.double() + 1e-6)).clamp(max=1.0).float()
        torch._foreach_mul_(list(grads), coeff)


def is_finite(total_norm: torch.Tensor) -> bool:
    return bool(torch.isfinite(total_norm).item())


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _cuda_backend() else torch.device("cpu")


def _cuda_backend() -> bool:
    return dist.is_initialized() and dist.get_backend() == "nccl"


def grads_for_norm(entries: Iterable[Tuple[torch.nn.Parameter, torch.Tensor, int]]) -> list:
    """The gradients that count on this rank, from (model parameter, gradient, offset) triples: the
    gradient is the flat slice of the parameter's gradient starting at element ``offset`` (the
    whole of it at offset 0, or a ZeRO slice). Rows this rank holds as a replica (key/value heads
    replicated when TP exceeds their number) are left out: their first holder counts them."""
    from megallama.parallel import state

    tp_rank, tp = state.get_tensor_model_parallel_rank(), state.get_tensor_model_parallel_world_size()
    pp_rank = state.get_pipeline_model_parallel_rank()
    grads = []
    for param, grad, offset in entries:
        if not counts_for_norm(param, tp_rank, pp_rank):
            continue
        split = tp_split_of(param)
        if split is None or not split.has_replicas(tp):
            grads.append(grad)
            continue
        flat, row = grad.reshape(-1), param[0].numel()  # replicas are split along dim 0 (fused q/k/v rows)
        for block in split.local_blocks(tp_rank, tp):
            lo = max(block.local_start * row, offset) - offset
            hi = min((block.local_start + block.length) * row, offset + flat.numel()) - offset
            if not block.replica and lo < hi:
                grads.append(flat[lo:hi])
    return grads
