"""How tensor parallelism splits one full tensor: the rule the layers, checkpoints and converters share.

A ``TensorSplit`` cuts dimension ``dim`` of a full tensor over the TP ranks. The dimension may hold
several fused ``parts`` one after the other (the rows of ``wq``, ``wk`` and ``wv`` in one ``wqkv``):
each part is cut separately, so a rank holds its rows of every part, part after part, and a rank's
shard is itself a smaller fused tensor of the same kind. ``pad_to_tp`` (a vocabulary) pads the one
part with zero rows up to a multiple of TP first; padding never reaches a checkpoint.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LocalBlock:
    """Elements ``[local_start, local_start + length)`` of a rank's shard along the split dim are
    elements ``[full_start, full_start + length)`` of the full tensor; ``replica``: another rank
    holds the same elements first (key/value heads replicated when TP exceeds their number)."""

    local_start: int
    full_start: int
    length: int
    replica: bool = False


@dataclass(frozen=True)
class _PartLayout:
    size: int  # padded
    local: int  # elements each rank holds
    replicas: int  # ranks holding the same elements (1: none)

    def start(self, rank: int) -> int:
        return (rank // self.replicas) * self.local


@dataclass(frozen=True)
class TensorSplit:
    """``units``: per part, the number of indivisible blocks (attention heads) it is made of; a
    part with fewer units than TP ranks gives each rank one whole unit, the same unit to TP / units
    consecutive ranks (Megatron's replicated key/value heads). Default: every element a unit."""

    dim: int
    parts: tuple[int, ...]
    pad_to_tp: bool = False
    units: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.pad_to_tp and len(self.parts) != 1:
            raise ValueError("only a tensor of one part (a vocabulary) can be padded for tensor parallelism")
        if self.units is not None and (len(self.units) != len(self.parts)
                                       or any(size % unit for size, unit in zip(self.parts, self.units))):
            raise ValueError(f"units {self.units} do not divide the parts {list(self.parts)}")

    @functools.lru_cache(maxsize=None)  # asked every step (gradient norm, qkv backward): a split has few TP sizes
    def _layout(self, tp: int) -> tuple[_PartLayout, ...]:
        if self.pad_to_tp:
            return (_PartLayout(math.ceil(self.parts[0] / tp) * tp, math.ceil(self.parts[0] / tp), 1),)
        layout = []
        for index, size in enumerate(self.parts):
            units = size if self.units is None else self.units[index]
            if units >= tp:
                if units % tp:
                    what = "" if self.units is None else f" in {units} heads"
                    raise ValueError(f"a part of {size}{what} along dim {self.dim} (of parts {list(self.parts)}) "
                                     f"is not divisible by the tensor-parallel size ({tp})")
                layout.append(_PartLayout(size, size // tp, 1))
            elif tp % units:
                raise ValueError(f"a part of {size} in {units} heads along dim {self.dim} cannot be replicated "
                                 f"evenly over the tensor-parallel size ({tp}): {units} must divide it")
            else:
                layout.append(_PartLayout(size, size // units, tp // units))
        return tuple(layout)

    def padded_parts(self, tp: int) -> tuple[int, ...]:
        """Part sizes once padded for ``tp`` ranks; a ValueError when a part does not split."""
        return tuple(part.size for part in self._layout(tp))

    def local_parts(self, tp: int) -> tuple[int, ...]:
        return tuple(part.local for part in self._layout(tp))

    def local_size(self, tp: int) -> int:
        return sum(self.local_parts(tp))

    def has_replicas(self, tp: int) -> bool:
        return any(part.replicas > 1 for part in self._layout(tp))

    def local_blocks(self, rank: int, tp: int) -> list[LocalBlock]:
        """Where a rank's shard lies in the full tensor along ``dim``, part by part (padding left out)."""
        blocks, local_start, full_start = [], 0, 0
        for size, part in zip(self.parts, self._layout(tp)):
            start = part.start(rank)
            length = max(0, min(part.local, size - start))  # less on the rank holding vocabulary padding
            if length:
                blocks.append(LocalBlock(local_start, full_start + start, length, rank % part.replicas != 0))
            local_start += part.local
            full_start += size
        return blocks

    def shard(self, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        """Rank ``rank``'s shard of ``full``. Always a copy: a view would keep the whole of ``full``
        alive, (TP - 1) / TP of it wasted in every parameter made from it."""
        dim = self.dim % full.dim()
        if full.shape[dim] != sum(self.parts):
            raise ValueError(f"a tensor of shape {tuple(full.shape)} has {full.shape[dim]} along dim {dim}, "
                             f"the split expects {sum(self.parts)} (parts {list(self.parts)})")
        layout = self._layout(tp)
        if self.pad_to_tp and layout[0].size != full.shape[dim]:
            pad = [0, 0] * (full.dim() - dim - 1) + [0, layout[0].size - full.shape[dim]]
            full = torch.nn.functional.pad(full, pad)
        pieces = [chunk.narrow(dim, part.start(rank), part.local)
                  for chunk, part in zip(full.split([part.size for part in layout], dim), layout)]
        return torch.cat(pieces, dim).clone(memory_format=torch.contiguous_format)

    def rank_major_to_full(self, ranks_side_by_side: torch.Tensor, tp: int, dim: int | None = None) -> torch.Tensor:
        """The full tensor from the ``tp`` shards laid side by side along ``dim`` (default the split's)
        in rank order; padding trimmed, each replicated unit taken from its first rank.
        Differentiable (narrow and cat)."""
        dim = (self.dim if dim is None else dim) % ranks_side_by_side.dim()
        layout = self._layout(tp)
        local = sum(part.local for part in layout)
        pieces, offset = [], 0
        for part in layout:
            for rank in range(0, tp, part.replicas):
                pieces.append(ranks_side_by_side.narrow(dim, rank * local + offset, part.local))
            offset += part.local
        full = torch.cat(pieces, dim) if len(pieces) > 1 else pieces[0]
        if self.pad_to_tp:
            full = full.narrow(dim, 0, self.parts[0])
        return full

    @torch.no_grad()
    def gather(self, local: torch.Tensor, tp: int, group=None) -> torch.Tensor:
        """The full tensor from every rank's ``local`` shard (a collective over ``group`` when
        ``tp`` > 1), in new storage."""
        dim = self.dim % local.dim()
        if tp == 1:
            side_by_side = local
        else:
            shards = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(shards, local.contiguous(), group=group)
            side_by_side = torch.cat(shards, dim)
        return self.rank_major_to_full(side_by_side, tp, dim).clone(memory_format=torch.contiguous_format)

    @torch.no_grad()
    def sum_over_replicas(self, local_grad: torch.Tensor, rank: int, tp: int, group=None) -> torch.Tensor:
        """``local_grad`` with each replicated unit's rows summed over the ranks holding it (each
        replica saw only its own query heads' share of the gradient); other rows unchanged. A
        collective over ``group``: one all-reduce of the replicated parts laid out in full."""
        dim = self.dim % local_grad.dim()
        layout = self._layout(tp)
        replicated = [(index, part) for index, part in enumerate(layout) if part.replicas > 1]
        if not replicated:
            return local_grad
        offsets = [sum(part.local for part in layout[:index]) for index in range(len(layout))]
        shape = list(local_grad.shape)
        shape[dim] = sum(part.size for _, part in replicated)
        full = local_grad.new_zeros(shape)
        base = 0
        for index, part in replicated:
            full.narrow(dim, base + part.start(rank), part.local).copy_(local_grad.narrow(dim, offsets[index], part.local))
            base += part.size
        dist.all_reduce(full, group=group)
        base = 0
        for index, part in replicated:
            local_grad.narrow(dim, offsets[index], part.local).copy_(full.narrow(dim, base + part.start(rank), part.local))
            base += part.size
        return local_grad

    def unique_local(self, local: torch.Tensor, rank: int, tp: int) -> list[torch.Tensor]:
        """Views of the parts of ``local`` that this rank holds first (not as a replica), e.g. to
        count each element once in a norm over all ranks."""
        dim = self.dim % local.dim()
        return [local.narrow(dim, block.local_start, block.length)
                for block in self.local_blocks(rank, tp) if not block.replica]


def tp_split_of(param: torch.Tensor) -> TensorSplit | None:
    """The split of a parameter made by the parallel layers (None: every TP rank holds all of it)."""
    return getattr(param, "tp_split", None)


def is_tensor_parallel(param: torch.Tensor) -> bool:
    """True for a parameter split over the tensor-parallel ranks (false for replicated norms)."""
    return tp_split_of(param) is not None
