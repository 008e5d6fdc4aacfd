"""Atomic file writes: a temporary file beside the target, renamed over it only when complete, so
an interrupted run never leaves a half file under the final name."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write; rename it to ``path`` if the block succeeds,
    remove it if not. ``fsync`` makes the file and the rename durable (checkpoints)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(folder)


@contextmanager
def atomic_open(path: str, mode: str = "wb", fsync: bool = False) -> Iterator[IO]:
    """``open(path, mode)`` through :func:`atomic_path`."""
    with atomic_path(path, fsync) as tmp, open(tmp, mode) as f:
        yield f
