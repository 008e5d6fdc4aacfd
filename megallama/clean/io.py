"""Reading compressed inputs, JSON (orjson when present), and atomic writes."""

from __future__ import annotations

import bz2
import gzip
import lzma
from typing import IO

from megallama.fileio import atomic_open

try:  # orjson is 3-5x faster on the JSONL hot path; the stdlib gives the same output
    import orjson

    def loads(data: bytes | str):
        return orjson.loads(data)

    def dumps_line(obj) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)

    JSONDecodeError = orjson.JSONDecodeError
except ImportError:  # pragma: no cover - exercised only where orjson is absent
    import json

    def loads(data: bytes | str):
        return json.loads(data)

    def dumps_line(obj) -> bytes:
        return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")

    JSONDecodeError = json.JSONDecodeError


def open_binary(path: str) -> IO[bytes]:
    """Open `path` for binary reading, decompressing .gz, .bz2, .xz and .zst by suffix."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        import zstandard

        return zstandard.open(path, "rb")
    return open(path, "rb")


def strip_compression(name: str) -> str:
    """`a.jsonl.gz` -> `a.jsonl`."""
    for ext in (".gz", ".bz2", ".xz", ".zst", ".zstd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def write_json(path: str, obj) -> None:
    """Atomically write `obj` as indented JSON."""
    import json

    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def read_json(path: str):
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)
