"""Opening compressed inputs by suffix (.gz, .bz2, .xz, .zst): a stream that ends early is an error
(TruncatedInput, naming the file), never a silent short read. Shared by the cleaners and the
tokenizing tools."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from typing import IO

_CHUNK = 1 << 16


class TruncatedInput(OSError):
    """A file, or a record in it, ends before its stated end (a download or copy cut short).
    Deliberately not an EOFError: readers such as warcio take EOFError for a clean end."""


class _CheckedReader(io.RawIOBase):
    """A raw stream over a decompressor whose ``_next(n)`` gives up to ``n`` bytes (b"" at the end)
    or raises TruncatedInput where the compressed data stops early."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._pos = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        data = self._next(len(buffer))
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _next(self, n: int) -> bytes:
        raise NotImplementedError

    def _truncated(self, detail: str) -> TruncatedInput:
        return TruncatedInput(f"{self._path}: compressed data ends early (truncated file): {detail}")


class _EndChecked(_CheckedReader):
    """Reads a stdlib decompressing stream, turning its EOFError (stream ended early) into TruncatedInput."""

    def __init__(self, stream: IO[bytes], path: str) -> None:
        super().__init__(path)
        self._stream = stream

    def _next(self, n: int) -> bytes:
        try:  # read1, not readinto: it returns what is there before raising at the damage
            return self._stream.read1(n)
        except EOFError as e:
            raise self._truncated(str(e)) from e

    def close(self) -> None:
        self._stream.close()
        super().close()


class _ZstdReader(_CheckedReader):
    """Decompresses a (multi-frame) zstd file; raises TruncatedInput if it ends inside a frame
    (zstandard's own stream reader returns the cut data silently, and cannot iterate lines)."""

    def __init__(self, path: str) -> None:
        import zstandard

        super().__init__(path)
        self._new = zstandard.ZstdDecompressor().decompressobj
        self._raw = open(path, "rb")
        self._d = self._new()
        self._pending = b""
        self._in_frame = False

    def _next(self, n: int) -> bytes:
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
                    raise self._truncated("the zstd stream ends inside a frame")
                return b""
            self._in_frame = True
            self._pending = self._d.decompress(chunk)
        data, self._pending = self._pending[:n], self._pending[n:]
        return data

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


def strip_compression(name: str) -> str:
    """`a.jsonl.gz` -> `a.jsonl`."""
    for ext in (".gz", ".bz2", ".xz", ".zst", ".zstd"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name
