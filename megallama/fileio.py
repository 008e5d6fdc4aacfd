"""Atomic file writes: a temporary file beside the target, renamed over it only when complete, so
an interrupted run never leaves a half file under the final name.

The finished file gets the mode ``open()`` would give it (0666 less the umask): ``mkstemp`` makes
its temporary 0600, which would hide checkpoints and data from teammates on a shared filesystem.
A run killed mid-write (kill -9, a node lost) leaves its temporary (``.NAME.XXXX.tmp``);
:func:`remove_temporaries` clears them where no write can be in progress.
"""
from __future__ import annotations

import glob
import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterable, Iterator

TEMPORARY_SUFFIX = ".tmp"


def _umask() -> int:
    """The process umask: from /proc on Linux (reading it with ``os.umask`` means setting it, which
    would race with other threads creating files); elsewhere set and put straight back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_paths(paths: Iterable[str]) -> list[str]:
    """`paths` in order, each file once however it is spelled (a/b, ./a/b, a link to it)."""
    unique, seen = [], set()
    for p in paths:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def make_folder(folder: str, flag: str) -> None:
    """Create ``folder`` (and its parents) for the output ``flag`` names; a file in the way is a
    one-line ValueError naming the flag, not ``[Errno 17] File exists``."""
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"{flag}: cannot make the folder {folder}: a file is in the way") from None


@contextmanager
def atomic_path(path: str, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write; rename it to ``path`` if the block succeeds,
    remove it if not. ``fsync`` makes the file and the rename durable (checkpoints)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=TEMPORARY_SUFFIX)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
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


def remove_temporaries(folder: str, name_pattern: str = "*") -> list[str]:
    """Delete the temporaries that interrupted atomic writes of ``folder/NAME`` (NAME matching
    ``name_pattern``) left behind; returns their paths. Call only where no write can be running."""
    pattern = os.path.join(glob.escape(folder), "." + name_pattern + ".*" + TEMPORARY_SUFFIX)
    removed = []
    for path in sorted(glob.glob(pattern)):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed
