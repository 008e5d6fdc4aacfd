"""Index arrays cached as ``.npy`` under a hash of everything that determines them.

One rank builds, the others wait at a barrier and then memory-map; each file is written under a
temporary name and renamed, and a ``description.json`` written last marks the set complete, so a
crash mid-build leaves nothing that a later run would mistake for a finished cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import numpy as np
import torch.distributed as dist

from megallama.fileio import atomic_open


def description_hash(description: dict) -> str:
    return hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _paths(cache_dir: str, stem: str, names) -> tuple[str, dict]:
    marker = os.path.join(cache_dir, f"{stem}-description.json")
    return marker, {n: os.path.join(cache_dir, f"{stem}-{n}.npy") for n in names}


def _complete(marker: str, files: dict) -> bool:
    return os.path.isfile(marker) and all(os.path.isfile(p) for p in files.values())


def _save(cache_dir: str, description: dict, marker: str, files: dict, arrays: dict) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    for name, path in files.items():
        arr = np.ascontiguousarray(arrays[name])
        with atomic_open(path, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    with atomic_open(marker, "w") as f:
        json.dump(description, f, indent=1, sort_keys=True)


def cached_arrays(cache_dir: str | None, kind: str, description: dict, names: list[str],
                  build: Callable[[], dict]) -> dict:
    """Load the arrays ``names`` for ``description`` from ``cache_dir``, building them if missing.

    With torch.distributed initialised, rank 0 builds and the others wait; a rank that still finds
    no cache afterwards (no shared file system) builds its own copy: the build is deterministic.
    ``cache_dir=None`` builds in memory every time.
    """
    if cache_dir is None:
        return build()
    stem = f"{kind}-{description_hash(description)}"
    marker, files = _paths(cache_dir, stem, names)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_rank() == 0 and not _complete(marker, files):
        _save(cache_dir, description, marker, files, build())
    if distributed:
        dist.barrier()
    if not _complete(marker, files):
        _save(cache_dir, description, marker, files, build())
    return {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in files.items()}
