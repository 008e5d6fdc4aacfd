"""Reading compressed inputs (a stream that ends early is an error, never a silent short read),
size caps on what a reader holds in memory, JSON (orjson when present), and atomic writes."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
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


class TruncatedInput(OSError):
    """A file, or a record in it, ends before its stated end (a download or copy cut short).
    Deliberately not an EOFError: readers such as warcio take EOFError for a clean end."""


class _EndChecked(io.RawIOBase):
    """Reads a decompressing stream, turning its EOFError (stream ended early) into TruncatedInput."""

    def __init__(self, stream: IO[bytes], path: str) -> None:
        self._stream, self._path = stream, path
        self._pos = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        try:  # read1, not readinto: it returns what is there before raising at the damage
            data = self._stream.read1(len(buffer))
        except EOFError as e:
            raise TruncatedInput(f"{self._path}: compressed data ends early (truncated file): {e}") from e
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._stream.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """Decompresses a (multi-frame) zstd file; raises TruncatedInput if it ends inside a frame
    (zstandard's own stream reader returns the cut data silently, and cannot iterate lines)."""

    def __init__(self, path: str) -> None:
        import zstandard

        self._path = path
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._raw = open(path, "rb")
        self._d = self._new()
        self._pending = b""
        self._in_frame = False
        self._pos = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        while not self._pending:
            if self._d.eof:  # the frame ended: what follows is the next frame
                rest = self._d.unused_data
                self._d, self._in_frame = self._new(), False
                if rest:
                    self._pending, self._in_frame = self._d.decompress(rest), True
                    continue
            chunk = self._raw.read(_CHUNK)
            if not chunk:
                if self._in_frame and not self._d.eof:
                    raise TruncatedInput(f"{self._path}: compressed data ends early (truncated file): "
                                         "the zstd stream ends inside a frame")
                return 0
            self._in_frame = True
            self._pending = self._d.decompress(chunk)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self._pos += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_binary(path: str, buffered: bool = True) -> IO[bytes]:
    """Open `path` for binary reading, decompressing .gz, .bz2, .xz and .zst by suffix. Reading
    a compressed stream that ends early raises TruncatedInput when the reader gets there.

    `buffered=False` is for readers that buffer themselves (warcio): each `read(n)` then makes a
    single read of the file or decompressor and returns what it got, so the data before a damaged
    part is delivered before the error (a buffered `read(n)` that meets the error mid-way loses
    the data it had gathered)."""
    if path.endswith(".gz"):
        stream = _EndChecked(gzip.open(path, "rb"), path)
    elif path.endswith(".bz2"):
        stream = _EndChecked(bz2.open(path, "rb"), path)
    elif path.endswith(".xz"):
        stream = _EndChecked(lzma.open(path, "rb"), path)
    elif path.endswith((".zst", ".zstd")):
        stream = _ZstdReader(path)
    else:
        return open(path, "rb", buffering=-1 if buffered else 0)
    return io.BufferedReader(stream, _CHUNK) if buffered else stream


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
