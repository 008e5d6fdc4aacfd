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
mmap=True)``.

Integrity: ``metadata.json`` records each rank file's size and SHA-256 (``files``); a rank checks
every file it opens before using it. A mismatch, a truncated or unreadable file or an unreadable
``metadata.json`` is a ``CheckpointError`` naming the file, the iteration and the previous complete
checkpoint to fall back to (``--ckpt-step``). Checkpoints written before checksums (no ``files``)
still load, unverified. ``verify_checkpoint`` checks a folder without building a model.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import pickle
import random
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megallama.fileio import atomic_open, remove_temporaries

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


def saved_iterations(root: str) -> list[int]:
    """Iterations with an ``iter_NNNNNNN`` folder under ``root`` (complete or not), ascending."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(root), "iter_*")):
        suffix = os.path.basename(path)[len("iter_"):]
        if suffix.isdigit() and os.path.isdir(path):
            found.append(int(suffix))
    return sorted(found)


def no_such_iteration(root: str, iteration: int) -> str:
    """One line for an iteration that has no folder under ``root``, naming the latest ones that do."""
    saved = saved_iterations(root)
    there = ("saved iterations: " + ("…, " if len(saved) > 5 else "") + ", ".join(map(str, saved[-5:]))) if saved \
        else "no iter_* folders there"
    folder = checkpoint_dir(root, iteration)
    return f"no checkpoint of iteration {iteration} in {root} ({folder} does not exist; {there})"


def previous_complete_iteration(root: str, before: int) -> Optional[int]:
    """The latest iteration below ``before`` whose folder is complete (its index reads, its files
    have their recorded sizes; not hashed: this answers an error message quickly)."""
    for iteration in reversed([i for i in saved_iterations(root) if i < before]):
        if not verify_checkpoint(root, iteration, checksums=False).problems:
            return iteration
    return None


def _damaged(iter_dir: str, what: str) -> CheckpointError:
    """One line: what is wrong, in which file of which iteration, and the way back."""
    root, name = os.path.split(os.path.normpath(iter_dir))
    suffix = name[len("iter_"):]
    if not (name.startswith("iter_") and suffix.isdigit()):
        return CheckpointError(f"checkpoint {iter_dir}: {what}")
    iteration = int(suffix)
    back = previous_complete_iteration(root, iteration)
    way = (f"the previous complete checkpoint is iteration {back}: resume from it with --ckpt-step {back}"
           if back is not None else f"no earlier complete checkpoint in {root}")
    return CheckpointError(f"checkpoint of iteration {iteration} is damaged: {what}; {way}")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(root: str) -> list[str]:
    """Delete what saves killed mid-write left under ``root`` (``.rank_*.pt.*.tmp`` and the like);
    only while no save to ``root`` is running (a run's start)."""
    removed = remove_temporaries(root)
    for iteration in saved_iterations(root):
        removed += remove_temporaries(checkpoint_dir(root, iteration))
    return removed


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


def write_rank_file(iter_dir: str, rank: int, pieces: Sequence[ShardedTensor], rank_state: dict) -> dict:
    """Write this rank's pieces (those with ``write``) and its private state; returns the file's
    record for ``write_metadata``: its name, size, SHA-256 and the metadata of its pieces."""
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
    path = os.path.join(iter_dir, rank_filename(rank))
    with atomic_open(path, "wb", fsync=True) as f:
        torch.save(payload, f)
    # Hashed from the page cache just written; what later reads are compared against.
    return {"file": rank_filename(rank), "bytes": os.path.getsize(path), "sha256": file_sha256(path),
            "pieces": metadata}


def write_metadata(iter_dir: str, iteration: int, world_size: int, rank_files: Sequence[dict], common: dict) -> None:
    """The index of every rank's pieces, each file's size and checksum, and the run state shared by
    all ranks (JSON-serialisable); ``rank_files`` are ``write_rank_file``'s records."""
    index: dict[str, list] = {}
    for record in rank_files:
        for entry in record["pieces"]:
            index.setdefault(entry["key"], []).append(entry)
    files = {r["file"]: {"bytes": r["bytes"], "sha256": r["sha256"]} for r in rank_files}
    document = {"format_version": FORMAT_VERSION, "iteration": iteration, "world_size": world_size,
                "common": common, "files": files, "pieces": index}
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
    record = write_rank_file(iter_dir, rank, pieces, rank_state)
    gathered = [None] * world if rank == 0 else None
    if distributed:
        torch.distributed.gather_object(record, gathered, dst=0, group=group)
    else:
        gathered = [record]
    if rank == 0:
        write_metadata(iter_dir, iteration, world, gathered, common)
        write_tracker(root, iteration)
    if distributed:
        torch.distributed.barrier(group)


def read_metadata(iter_dir: str) -> dict:
    path = os.path.join(iter_dir, METADATA_FILENAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{iter_dir} is not a complete checkpoint: {METADATA_FILENAME} is missing")
    try:
        with open(path) as f:
            document = json.load(f)
        if not isinstance(document, dict) or not isinstance(document.get("pieces"), dict):
            raise ValueError("not a checkpoint index")
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(iter_dir, f"{path} is unreadable ({type(error).__name__}: {error})") from None
    if document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {document.get('format_version')} is not {FORMAT_VERSION}")
    return document


def has_checksums(metadata: dict) -> bool:
    """False for checkpoints written before files were checksummed (they load unverified)."""
    return "files" in metadata


# Files of a loaded index already hashed, kept on the in-memory index (never written back) so that
# loading the model, then the optimizer, then a converter's key after key reads each file once.
_CHECKED = "_checked_files"


def _file_problem(iter_dir: str, metadata: dict, filename: str, checksums: bool = True) -> Optional[str]:
    """What is wrong with rank file ``filename`` against its record in ``metadata`` (None: nothing)."""
    path = os.path.join(iter_dir, filename)
    if not os.path.isfile(path):
        return f"{path} is missing (all ranks' files must be on one shared filesystem)"
    if not has_checksums(metadata):
        return None
    recorded = metadata["files"].get(filename)
    if recorded is None:
        return f"{path} is not listed in {METADATA_FILENAME}"
    size = os.path.getsize(path)
    if size != recorded["bytes"]:
        return f"{path} has {size} bytes, {recorded['bytes']} were written (truncated or overwritten)"
    if checksums and file_sha256(path) != recorded["sha256"]:
        return f"{path} does not match its SHA-256 in {METADATA_FILENAME} (corrupted)"
    return None


def load_weights_only(path: str) -> dict:
    """``torch.load`` (weights only, memory-mapped); ValueError with one line when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # torch's message invites a load with weights_only=False: never here
        raise ValueError(f"{path} is unreadable (it holds objects other than tensors and plain data, which are "
                         "never unpickled)") from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:  # truncated zip, not a torch file
        text = str(error).strip()
        raise ValueError(f"{path} is unreadable ({text.splitlines()[0] if text else type(error).__name__})") from None


def check_file(iter_dir: str, metadata: dict, filename: str) -> None:
    """Raise ``CheckpointError`` unless ``filename`` is present with the size and SHA-256 recorded."""
    if filename in metadata.get(_CHECKED, ()):
        return
    problem = _file_problem(iter_dir, metadata, filename)
    if problem:
        raise _damaged(iter_dir, problem)
    metadata.setdefault(_CHECKED, set()).add(filename)


class _RankFiles:
    """Lazily memory-maps rank files of one checkpoint folder, each checked before its first use."""

    def __init__(self, iter_dir: str, metadata: dict):
        self.iter_dir, self.metadata, self._open = iter_dir, metadata, {}

    def payload(self, filename: str) -> dict:
        if filename not in self._open:
            check_file(self.iter_dir, self.metadata, filename)
            try:
                self._open[filename] = load_weights_only(os.path.join(self.iter_dir, filename))
            except ValueError as error:
                raise _damaged(self.iter_dir, str(error)) from None
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
    files, missing = _RankFiles(iter_dir, metadata), []
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


def read_rank_state(iter_dir: str, rank: int, metadata: Optional[dict] = None) -> dict:
    metadata = read_metadata(iter_dir) if metadata is None else metadata
    return _RankFiles(iter_dir, metadata).payload(rank_filename(rank))["rank_state"]


@dataclass
class VerifyReport:
    """What ``verify_checkpoint`` found; a checkpoint is good when ``problems`` is empty."""

    iteration: Optional[int]
    iter_dir: Optional[str]
    files_checked: int = 0
    checksummed: bool = True
    problems: list = field(default_factory=list)
    stale_temporaries: list = field(default_factory=list)


def verify_checkpoint(root: str, iteration: Optional[int] = None, checksums: bool = True,
                      progress: bool = False) -> VerifyReport:
    """Check one checkpoint (the tracker's, or ``iteration``) without building a model: the index
    reads, every rank file it names is there with its recorded size and SHA-256 (or, for checkpoints
    written before checksums, loads), and every piece points at a file that exists. Without
    ``checksums`` only sizes are compared (no file is read). ``progress``: a bar over the files on a
    terminal's stderr (hashing a large run's checkpoint takes minutes)."""
    if iteration is None:
        try:
            iteration = read_tracker(root)
        except CheckpointError as error:
            return VerifyReport(None, None, problems=[str(error)])
        if iteration is None:
            return VerifyReport(None, None, problems=[f"no checkpoint in {root} ({TRACKER_FILENAME} not found)"])
    iter_dir = checkpoint_dir(root, iteration)
    if not os.path.isdir(iter_dir):  # never saved (a mistyped --iteration), not an incomplete save
        return VerifyReport(iteration, None, problems=[no_such_iteration(root, iteration)])
    report = VerifyReport(iteration, iter_dir, stale_temporaries=sorted(
        glob.glob(os.path.join(glob.escape(iter_dir), ".*.tmp"))))
    path = os.path.join(iter_dir, METADATA_FILENAME)
    try:
        with open(path) as f:
            metadata = json.load(f)
        pieces = metadata["pieces"]
    except FileNotFoundError:
        report.problems.append(f"{path} is missing (an incomplete save)")
        return report
    except (OSError, ValueError, KeyError, TypeError) as error:
        report.problems.append(f"{path} is unreadable ({type(error).__name__}: {error})")
        return report
    report.checksummed = has_checksums(metadata)
    named = {entry["file"] for entries in pieces.values() for entry in entries}
    files = sorted(set(metadata.get("files", {})) | named)
    from tqdm import tqdm

    # disable=None: on a terminal only, so logs and captured output keep their one line per problem
    shown = None if progress and checksums else True
    for filename in tqdm(files, desc=f"checking {iter_dir}", unit="file", disable=shown):
        report.files_checked += 1
        problem = _file_problem(iter_dir, metadata, filename, checksums)
        if problem is None and checksums and not report.checksummed:  # nothing recorded: it must load
            try:
                load_weights_only(os.path.join(iter_dir, filename))
            except ValueError as error:
                problem = str(error)
        if problem:
            report.problems.append(problem)
    return report


def latest_checkpoint(root: str, iteration: Optional[int] = None) -> Optional[tuple[int, str, dict]]:
    """(iteration, folder, metadata) of the checkpoint the tracker names (or of ``iteration``),
    None when nothing was saved under ``root``."""
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            return None
    iter_dir = checkpoint_dir(root, iteration)
    if not os.path.isdir(iter_dir):
        raise CheckpointError(no_such_iteration(root, iteration))
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
