"""Size caps on what a cleaning reader holds in memory, JSON (orjson when present), and atomic
writes. Compressed inputs are opened through megallama.compressed."""

from __future__ import annotations

from typing import IO, Iterator

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


# The most bytes one record (a JSONL line, a WET record, an archive member, a book file) may
# decompress to: a reader holds a record in memory, so a "bomb" (a few MB that inflate to GBs)
# must stop at a cap instead of taking the machine's memory. Overridable per run
# (tools/clean_corpus.py --max-record-bytes).
DEFAULT_MAX_RECORD_BYTES = 256 << 20
_CHUNK = 1 << 16


class RecordTooLarge(ValueError):
    """A record decompresses to more than the cap."""


def read_capped(f: IO[bytes], max_bytes: int, what: str = "record") -> bytes:
    """All of `f`, or RecordTooLarge once it passes `max_bytes` (never more held in memory)."""
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise RecordTooLarge(f"{what} is larger than the {max_bytes:,}-byte cap (--max-record-bytes)")
    return data


def iter_lines(f: IO[bytes], max_bytes: int) -> Iterator[bytes | None]:
    """The lines of `f` (with their newline); None in place of a line over `max_bytes`, whose
    bytes are skipped without being held."""
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(_CHUNK)
            yield None
            continue
        yield line


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
