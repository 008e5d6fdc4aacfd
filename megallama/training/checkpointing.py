"""Checkpoints that load into any parallel layout.

Layout on disk (Megatron's names outside the iteration folder)::

    SAVE/latest_checkpointed_iteration.txt     the iteration number; written last, atomically
    SAVE/iter_0000100/rank_00000.pt            one file per rank: its tensor pieces and RNG states
    SAVE/iter_0000100/metadata.json            which piece of which full tensor each file holds,
                                               plus iteration, consumed samples, config, schedule

Every tensor is stored as pieces of its *full* (unsharded) form: a piece says which rectangle of
the full tensor it covers (``offsets`` + ``shape``) and, for ZeRO shards of flattened buffers,
which flat range of that rectangle. A loader asks for the pieces its own layout needs and they are
cut out of whatever pieces were saved, so TP, PP and DP (distributed optimizer included) can all
change between save and load. Replicated pieces are written once (``write=False`` elsewhere).

Crash safety: each file is written to a temporary name and renamed; ``metadata.json`` is written
after every rank's file exists; the tracker is replaced last. A crash at any point leaves the
tracker naming the previous, complete checkpoint. Loading uses ``torch.load(weights_only=True,
mmap=True)``, so a rank reads only the bytes of the pieces it needs.
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megallama.fileio import atomic_open

FORMAT_VERSION = 1
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
METADATA_FILENAME = "metadata.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not match the model."""


@dataclass
class ShardedTensor:
    """One rank's piece of a full tensor ``key`` of shape ``global_shape``.

    The piece is the rectangle starting at ``offsets`` with shape ``shape`` (default
    ``data.shape``), or, when ``flat_range = (a, b)`` is set, elements ``a:b`` of that rectangle
    flattened. On save ``data`` holds the values; on load it is the destination filled in place.
    """

    key: str
    data: torch.Tensor
    global_shape: tuple
    offsets: tuple
    shape: Optional[tuple] = None
    flat_range: Optional[tuple] = None
    write: bool = True

    def __post_init__(self):
        self.global_shape, self.offsets = tuple(self.global_shape), tuple(self.offsets)
        self.shape = tuple(self.data.shape) if self.shape is None else tuple(self.shape)
        if len(self.offsets) != len(self.global_shape) or len(self.shape) != len(self.global_shape):
            raise ValueError(f"{self.key}: offsets {self.offsets} / shape {self.shape} do not match "
                             f"global shape {self.global_shape}")
        if self.flat_range is not None:
            self.flat_range = tuple(self.flat_range)
            if self.data.numel() != self.flat_range[1] - self.flat_range[0]:
                raise ValueError(f"{self.key}: flat range {self.flat_range} holds {self.data.numel()} elements")
        elif tuple(self.data.shape) != self.shape:
            raise ValueError(f"{self.key}: data shape {tuple(self.data.shape)} is not the piece's shape {self.shape}")


def replicated(key: str, data: torch.Tensor, write: bool = True) -> ShardedTensor:
    """A tensor every holder has whole."""
    return ShardedTensor(key, data, tuple(data.shape), (0,) * data.dim(), write=write)


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def rank_filename(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def read_tracker(root: str) -> Optional[int]:
    """The latest complete iteration under ``root``, or None when nothing was saved there."""
    path = os.path.join(root, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path} should hold an iteration number, found {text!r}") from None


def write_tracker(root: str, iteration: int) -> None:
    with atomic_open(os.path.join(root, TRACKER_FILENAME), "w", fsync=True) as f:
        f.write(f"{iteration}\n")


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor owning exactly its bytes (torch.save writes a view's whole storage)."""
    t = t.detach().cpu()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def write_rank_file(iter_dir: str, rank: int, pieces: Sequence[ShardedTensor], rank_state: dict) -> list[dict]:
    """Write this rank's pieces (those with ``write``) and its private state; returns their metadata."""
    tensors, metadata = [], []
    for piece in pieces:
        if not piece.write:
            continue
        metadata.append({
            "key": piece.key, "file": rank_filename(rank), "index": len(tensors),
            "global_shape": list(piece.global_shape), "offsets": list(piece.offsets), "shape": list(piece.shape),
            "flat_range": None if piece.flat_range is None else list(piece.flat_range),
            "dtype": str(piece.data.dtype).removeprefix("torch."),
        })
        tensors.append(_own_storage(piece.data))
    os.makedirs(iter_dir, exist_ok=True)
    payload = {"tensors": tensors, "rank_state": rank_state}
    with atomic_open(os.path.join(iter_dir, rank_filename(rank)), "wb", fsync=True) as f:
        torch.save(payload, f)
    return metadata


def write_metadata(iter_dir: str, iteration: int, world_size: int, pieces: Sequence[dict], common: dict) -> None:
    """The index of every rank's pieces plus the run state shared by all ranks (JSON-serialisable)."""
    index: dict[str, list] = {}
    for entry in pieces:
        index.setdefault(entry["key"], []).append(entry)
    document = {"format_version": FORMAT_VERSION, "iteration": iteration, "world_size": world_size,
                "common": common, "pieces": index}
    with atomic_open(os.path.join(iter_dir, METADATA_FILENAME), "w", fsync=True) as f:
        json.dump(document, f)


def save_checkpoint(
    root: str, iteration: int, pieces: Sequence[ShardedTensor], rank_state: dict, common: dict,
    *, group: Optional[torch.distributed.ProcessGroup] = None,
) -> None:
    """Collective over ``group`` (default: the world): every rank writes its file, rank 0 the index
    and then the tracker. Works without torch.distributed initialised (a single process)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank(group) if distributed else 0
    world = torch.distributed.get_world_size(group) if distributed else 1
    iter_dir = checkpoint_dir(root, iteration)
    metadata = write_rank_file(iter_dir, rank, pieces, rank_state)
    gathered = [None] * world if rank == 0 else None
    if distributed:
        torch.distributed.gather_object(metadata, gathered, dst=0, group=group)
    else:
        gathered = [metadata]
    if rank == 0:
        write_metadata(iter_dir, iteration, world, [m for per_rank in gathered for m in per_rank], common)
        write_tracker(root, iteration)
    if distributed:
        torch.distributed.barrier(group)


def read_metadata(iter_dir: str) -> dict:
    path = os.path.join(iter_dir, METADATA_FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{iter_dir} is not a complete checkpoint: {METADATA_FILENAME} is missing")
    with open(path) as f:
        document = json.load(f)
    if document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {document.get('format_version')} is not {FORMAT_VERSION}")
    return document


class _RankFiles:
    """Lazily memory-maps rank files of one checkpoint folder."""

    def __init__(self, iter_dir: str):
        self.iter_dir, self._open = iter_dir, {}

    def payload(self, filename: str) -> dict:
        if filename not in self._open:
            path = os.path.join(self.iter_dir, filename)
            if not os.path.isfile(path):
                raise CheckpointError(f"checkpoint file {path} is missing (all ranks' files must be on one "
                                      "shared filesystem)")
            self._open[filename] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return self._open[filename]

    def tensor(self, entry: dict) -> torch.Tensor:
        return self.payload(entry["file"])["tensors"][entry["index"]]


def _overlap(off_a, shape_a, off_b, shape_b) -> Optional[list[tuple[int, int]]]:
    """Per-dimension [start, stop) of the intersection of two rectangles, None when empty."""
    bounds = []
    for oa, sa, ob, sb in zip(off_a, shape_a, off_b, shape_b):
        start, stop = max(oa, ob), min(oa + sa, ob + sb)
        if start >= stop:
            return None
        bounds.append((start, stop))
    return bounds


def _local(bounds, offsets) -> tuple:
    return tuple(slice(start - o, stop - o) for (start, stop), o in zip(bounds, offsets))


def _source_rectangles(key: str, entries: list[dict], files: _RankFiles) -> dict[tuple, Any]:
    """Group saved pieces by rectangle; returns {(offsets, shape): loader of the whole rectangle}."""
    groups: dict[tuple, dict] = {}
    for e in entries:
        rect = (tuple(e["offsets"]), tuple(e["shape"]))
        flat = None if e["flat_range"] is None else tuple(e["flat_range"])
        groups.setdefault(rect, {}).setdefault(flat, e)  # duplicates (replicas written twice): first wins

    def loader(rect, parts):
        def load() -> torch.Tensor:
            if None in parts:
                return files.tensor(parts[None])
            numel = math.prod(rect[1])
            ranges = sorted(parts)
            position = 0
            for a, b in ranges:
                if a != position:
                    break
                position = b
            if position != numel:
                raise CheckpointError(f"tensor {key!r}: the saved flat pieces of rectangle {rect} cover "
                                      f"{position} of {numel} elements")
            return torch.cat([files.tensor(parts[r]).reshape(-1) for r in ranges]).reshape(rect[1])
        return load

    return {rect: loader(rect, parts) for rect, parts in groups.items()}


def load_pieces(iter_dir: str, metadata: dict, targets: Sequence[ShardedTensor], strict: bool = True) -> list[str]:
    """Fill every target's ``data`` from the saved pieces, whatever layout saved them.

    Returns the keys not found in the checkpoint (an error when ``strict``).
    """
    files, missing = _RankFiles(iter_dir), []
    by_key: dict[str, list[ShardedTensor]] = {}
    for t in targets:
        by_key.setdefault(t.key, []).append(t)
    for key, wanted in by_key.items():
        entries = metadata["pieces"].get(key)
        if not entries:
            missing.append(key)
            continue
        saved_shape = tuple(entries[0]["global_shape"])
        rectangles = _source_rectangles(key, entries, files)
        cache: dict[tuple, torch.Tensor] = {}
        for t in wanted:
            if t.global_shape != saved_shape:
                raise CheckpointError(f"tensor {key!r} has shape {saved_shape} in {iter_dir} but the model "
                                      f"expects {t.global_shape}")
            out = t.data if t.flat_range is None else torch.empty(t.shape, dtype=t.data.dtype)
            covered = 0
            for rect, load in rectangles.items():
                bounds = _overlap(t.offsets, t.shape, *rect)
                if bounds is None:
                    continue
                if rect not in cache:
                    cache[rect] = load()
                out[_local(bounds, t.offsets)] = cache[rect][_local(bounds, rect[0])]
                covered += math.prod(stop - start for start, stop in bounds)
            if covered != math.prod(t.shape):
                raise CheckpointError(f"tensor {key!r}: {iter_dir} holds {covered} of the {math.prod(t.shape)} "
                                      f"elements at offsets {t.offsets}, shape {t.shape}")
            if t.flat_range is not None:
                t.data.copy_(out.reshape(-1)[t.flat_range[0]:t.flat_range[1]].reshape(t.data.shape))
    if missing and strict:
        raise CheckpointError(f"{iter_dir} has no tensor named {', '.join(repr(k) for k in missing[:5])}"
                              + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    return missing


def read_rank_state(iter_dir: str, rank: int) -> dict:
    return _RankFiles(iter_dir).payload(rank_filename(rank))["rank_state"]


def latest_checkpoint(root: str, iteration: Optional[int] = None) -> Optional[tuple[int, str, dict]]:
    """(iteration, folder, metadata) of the checkpoint the tracker names (or of ``iteration``),
    None when nothing was saved under ``root``."""
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            return None
    iter_dir = checkpoint_dir(root, iteration)
    return iteration, iter_dir, read_metadata(iter_dir)


def capture_rng_state(extra: Optional[dict] = None) -> dict:
    """Every RNG this rank draws from, in types ``torch.load(weights_only=True)`` accepts.

    ``extra`` holds further named states (the tensor-parallel RNG tracker's)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }
    if extra:
        state["extra"] = dict(extra)
    return state


def restore_rng_state(state: dict) -> Optional[dict]:
    """Put back what ``capture_rng_state`` took; returns its ``extra`` states for their owner."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return state.get("extra")
