"""This rank's model and optimizer state as pieces of full tensors (see ``storage``).

Keys are layout-free: ``model.NAME`` for a parameter (names carry global layer ids, so a layer
keeps its key whatever stage holds it) and ``optimizer.NAME.{main_param,exp_avg,exp_avg_sq}`` for
the AdamW state. Where a piece lies in the full tensor comes from the parameter's ``TensorSplit``
(from the model's parameter table, attached by the parallel layers); a vocabulary padded for TP
keeps its unpadded size in the checkpoint. Optimizer state is taken from
the optimizer's entries as they are, flat slices under ZeRO, so saving gathers nothing.

A piece is written by one rank only: model weights by DP rank 0, optimizer state by every DP rank
under ZeRO (each its slice) else by DP rank 0, and TP-replicated parameters by TP rank 0. A copy of
another parameter (``stored_as``: a tied head on a last pipeline stage) is read under that one's
keys and never written, so a tied checkpoint holds the embedding only, whatever the layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from megallama.checkpoint.storage import ShardedTensor
from megallama.parallel.split import TensorSplit, is_tensor_parallel, tp_split_of

OPTIMIZER_MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class RowBlock:
    """Local rows [start, stop) of a parameter are the rectangle at ``offsets`` of the full tensor;
    ``replica``: another TP rank holds (and saves) the same rows."""

    start: int
    stop: int
    offsets: tuple
    global_shape: tuple
    replica: bool = False


def row_blocks(split: TensorSplit | None, full_shape: tuple, tp_rank: int, tp_size: int) -> list[RowBlock]:
    """How a rank's shard of a parameter (full shape ``full_shape``, split by ``split``) maps onto
    the full tensor, as blocks of consecutive local rows; the zero rows padding a vocabulary for TP
    are left out of the checkpoint."""
    if not full_shape:
        return [RowBlock(0, 1, (), ())]
    zeros = (0,) * len(full_shape)
    if split is None or tp_size == 1:
        return [RowBlock(0, full_shape[0], zeros, full_shape)]
    blocks = split.local_blocks(tp_rank, tp_size)
    if split.dim == 0:
        return [RowBlock(b.local_start, b.local_start + b.length, (b.full_start,) + zeros[1:], full_shape, b.replica)
                for b in blocks]
    if len(blocks) != 1:
        raise NotImplementedError(f"fused parts split along dim {split.dim} are not supported in checkpoints")
    offsets = tuple(blocks[0].full_start if d == split.dim else 0 for d in range(len(full_shape)))
    return [RowBlock(0, full_shape[0], offsets, full_shape)]


def _param_blocks(param: torch.Tensor, tp_rank: int, tp_size: int) -> list[RowBlock]:
    split = tp_split_of(param)
    return row_blocks(split, tuple(param.full_shape) if split else tuple(param.shape), tp_rank, tp_size)


def _row_numel(shape: tuple) -> int:
    n = 1
    for s in shape[1:]:
        n *= s
    return n


def _block_pieces(key: str, data: torch.Tensor, blocks: Iterable[RowBlock], param_shape: tuple,
                  flat_range: tuple | None, write: bool) -> list[ShardedTensor]:
    """Pieces of ``data``: the whole local parameter, or (``flat_range``) its flat slice [lo, hi)."""
    pieces = []
    row = _row_numel(param_shape)
    for b in blocks:
        shape = (b.stop - b.start,) + tuple(param_shape[1:]) if param_shape else ()
        if flat_range is None:
            piece = data if not param_shape else data[b.start:b.stop]
            pieces.append(ShardedTensor(key, piece, b.global_shape, b.offsets, shape=shape,
                                        write=write and not b.replica))
            continue
        lo, hi = flat_range
        a, z = max(lo, b.start * row), min(hi, b.stop * row)
        if a >= z:
            continue
        pieces.append(ShardedTensor(key, data.reshape(-1)[a - lo:z - lo], b.global_shape, b.offsets, shape=shape,
                                    flat_range=(a - b.start * row, z - b.start * row), write=write and not b.replica))
    return pieces


def _named_params(chunks):
    for chunk in chunks:
        yield from getattr(chunk, "module", chunk).named_parameters()


def stored_name(name: str, param: torch.Tensor) -> str:
    """The name ``param`` is stored under: its own, or the one it copies (``stored_as``)."""
    return getattr(param, "stored_as", None) or name


def _writes(param: torch.Tensor, tp_rank: int, tp_size: int) -> bool:
    """Whether this rank's piece is the one saved, as far as TP and copies decide."""
    sharded = is_tensor_parallel(param) and tp_size > 1
    return (sharded or tp_rank == 0) and getattr(param, "stored_as", None) is None


def model_pieces(chunks, tp_rank: int, tp_size: int, dp_rank: int) -> list[ShardedTensor]:
    """Pieces of this rank's model parameters (``chunks``: modules or DDP-wrapped modules)."""
    pieces = []
    for name, p in _named_params(chunks):
        write = dp_rank == 0 and _writes(p, tp_rank, tp_size)
        pieces += _block_pieces(f"model.{stored_name(name, p)}", p.data, _param_blocks(p, tp_rank, tp_size),
                                tuple(p.shape), None, write)
    return pieces


def _adam_state(optimizer, main: torch.Tensor) -> dict:
    return optimizer.optimizer.state.get(main, {})


def optimizer_pieces(optimizer, tp_rank: int, tp_size: int, dp_rank: int,
                     destination: bool = False) -> tuple[list[ShardedTensor], dict]:
    """Pieces of the AdamW state (fp32 main weights where they are copies, both moments).

    With ``destination``, fresh buffers to load into are returned instead of the live state, with
    a map {(entry index, what): buffer} to install them afterwards.
    """
    pieces, buffers = [], {}
    for index, e in enumerate(optimizer.entries):
        write = (optimizer.sharded or dp_rank == 0) and _writes(e.param, tp_rank, tp_size)
        blocks = _param_blocks(e.param, tp_rank, tp_size)
        name = stored_name(e.name, e.param)
        whats = (() if e.main is e.param else ("main_param",)) + OPTIMIZER_MOMENTS
        for what in whats:
            if destination:
                data = buffers.setdefault((index, what), torch.zeros(e.main.numel(), dtype=torch.float32))
            elif what == "main_param":
                data = e.main.detach()
            else:
                state = _adam_state(optimizer, e.main)
                if what not in state:
                    continue  # no step taken yet: nothing to save
                data = state[what]
            pieces += _block_pieces(f"optimizer.{name}.{what}", data, blocks, tuple(e.param.shape),
                                    (e.lo, e.hi), write)
    return pieces, buffers


def optimizer_step_count(optimizer) -> int:
    for e in optimizer.entries:
        step = _adam_state(optimizer, e.main).get("step")
        if step is not None:
            return int(float(step))
    return 0


@torch.no_grad()
def install_optimizer_state(optimizer, buffers: dict, step: int, missing: set) -> None:
    """Put loaded buffers into the optimizer: main weights (from the model parameter when the
    checkpoint had none) and, after at least one step, AdamW's moments and step count."""
    for index, e in enumerate(optimizer.entries):
        name = stored_name(e.name, e.param)
        if e.main is not e.param:
            key = f"optimizer.{name}.main_param"
            source = e.param.detach().reshape(-1)[e.lo:e.hi] if key in missing else buffers[(index, "main_param")]
            e.main.data.copy_(source.view_as(e.main))
        if step == 0:
            continue
        group = next(g for g in optimizer.optimizer.param_groups if any(t is e.main for t in g["params"]))
        # torch keeps AdamW's step on the parameter's device for fused/capturable groups, else on CPU.
        on_device = group.get("fused") or group.get("capturable")
        state = {"step": torch.tensor(float(step), dtype=torch.float32, device=e.main.device if on_device else "cpu")}
        for what in OPTIMIZER_MOMENTS:
            if f"optimizer.{name}.{what}" in missing:
                raise KeyError(f"the checkpoint has no AdamW {what} for {name} (use --no-load-optim to start "
                               "the optimizer afresh)")
            state[what] = buffers[(index, what)].to(e.main.device).view_as(e.main)
        optimizer.optimizer.state[e.main] = state
