"""Megatron's indexed dataset format (``PREFIX.bin`` + ``PREFIX.idx``), written and read byte for byte.

``.idx`` layout (little endian): the 9-byte magic ``MMIDIDX\\0\\0``, u64 version 1, u8 dtype code,
u64 sequence count, u64 document-index count (documents + 1), then int32 sequence lengths, int64
byte offsets of each sequence in ``.bin``, and int64 document indices (the sequence number where
each document ends, starting with 0). ``.bin`` holds the tokens back to back.

A "sequence" is one stored token array; a "document" is a run of sequences. Preprocessing writes
one sequence per document unless sentences are split, so both counts usually agree.
"""
from __future__ import annotations

import os
import shutil
import struct
from array import array
from typing import Iterable, Sequence

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = 34

# Megatron's dtype codes (megatron.core.datasets.indexed_dataset.DType).
DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.float64): 6,
    np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int | None) -> np.dtype:
    """Token dtype Megatron picks for a vocabulary: uint16 below 65,500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


def as_token_dtype(tokens: np.ndarray, dtype) -> np.ndarray:
    """``tokens`` in a dataset's ``dtype``, refusing ids it cannot hold (a plain cast would wrap)."""
    if tokens.dtype == dtype:
        return tokens
    if tokens.size and np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if tokens.min() < info.min or tokens.max() > info.max:
            raise ValueError(f"token ids {tokens.min()}..{tokens.max()} do not fit the dataset dtype {np.dtype(dtype)}")
    return tokens.astype(dtype)


class IndexedDatasetWriter:
    """Streams token arrays into ``PREFIX.bin`` and writes ``PREFIX.idx`` on :meth:`finalize`.

    Both files are written under temporary names and renamed into place only when complete (the
    ``.idx`` last), so a crash never leaves a pair that looks finished. Memory holds only the index
    (12 bytes per sequence), never the tokens.

    Use as a context manager: leaving the block normally finalizes, an exception discards the files.
    """

    def __init__(self, prefix: str, dtype=np.int32):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} has no Megatron dtype code; use one of {sorted(map(str, DTYPE_CODES))}")
        parent = os.path.dirname(os.path.abspath(prefix))
        try:
            os.makedirs(parent, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise NotADirectoryError(f"cannot write {prefix}.bin/.idx: a file is in the way of the folder {parent}") from None
        for path in (bin_path(prefix), idx_path(prefix)):
            if os.path.isdir(path):  # found now, not by the rename after all the work
                raise IsADirectoryError(f"cannot write {path}: it is a folder")
        self._tmp_suffix = f".tmp{os.getpid()}"
        self._bin_tmp = bin_path(prefix) + self._tmp_suffix
        self._bin = open(self._bin_tmp, "wb")
        self.sequence_lengths = array("i")
        self.document_indices = array("q", [0])
        self.num_tokens = 0
        self._closed = False

    def add_item(self, tokens) -> None:
        """Append one sequence (not yet ending a document; see :meth:`end_document`)."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a sequence must be 1-D, got shape {arr.shape}")
        if arr.dtype != self.dtype:
            if arr.size and np.issubdtype(arr.dtype, np.integer):
                info = np.iinfo(self.dtype) if np.issubdtype(self.dtype, np.integer) else None
                if info is not None and (arr.min() < info.min or arr.max() > info.max):
                    raise ValueError(
                        f"token ids {arr.min()}..{arr.max()} do not fit the dataset dtype {self.dtype}"
                    )
            arr = arr.astype(self.dtype)
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"a sequence of {arr.size} tokens exceeds the int32 length field")
        self._bin.write(arr.tobytes())
        self.sequence_lengths.append(arr.size)
        self.num_tokens += arr.size

    def end_document(self) -> None:
        """Mark the sequences added since the last call as one document."""
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens, lengths: Sequence[int] | None = None) -> None:
        """Append a document: one sequence, or several when ``lengths`` splits ``tokens``."""
        arr = np.asarray(tokens)
        if lengths is None:
            self.add_item(arr)
        else:
            if sum(lengths) != arr.size:
                raise ValueError(f"lengths sum to {sum(lengths)} but the document has {arr.size} tokens")
            start = 0
            for n in lengths:
                self.add_item(arr[start:start + n])
                start += n
        self.end_document()

    def add_documents(self, tokens, lengths) -> None:
        """Append many one-sequence documents at once: ``tokens`` back to back, ``lengths`` each."""
        lengths = np.asarray(lengths, dtype=np.int64)
        arr = np.asarray(tokens)
        if int(lengths.sum()) != arr.size or (lengths < 0).any():
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {arr.size} tokens were given")
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            raise ValueError("a document exceeds the int32 length field")
        arr = as_token_dtype(arr, self.dtype)
        self._bin.write(arr.tobytes())
        first = len(self.sequence_lengths)
        self.sequence_lengths.frombytes(lengths.astype(np.int32).tobytes())
        self.document_indices.frombytes(np.arange(first + 1, first + 1 + lengths.size, dtype=np.int64).tobytes())
        self.num_tokens += arr.size

    def add_index(self, prefix: str) -> None:
        """Append every sequence and document of an existing dataset (used to merge shards)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"cannot merge {prefix} ({other.dtype}) into a {self.dtype} dataset")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.frombytes(np.ascontiguousarray(other.sequence_lengths, dtype=np.int32).tobytes())
        self.document_indices.frombytes((other.document_indices[1:].astype(np.int64) + offset).tobytes())
        self.num_tokens += int(other.sequence_lengths.sum(dtype=np.int64))
        del other
        with open(bin_path(prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, 16 << 20)

    def finalize(self) -> None:
        """Write the index and move both files into place (``.bin`` first, ``.idx`` last)."""
        if self._closed:
            return
        if self.document_indices[-1] != len(self.sequence_lengths):
            self.end_document()  # trailing sequences added with add_item form a last document
        self._bin.close()
        lengths = np.frombuffer(self.sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        idx_tmp = idx_path(self.prefix) + self._tmp_suffix
        with open(idx_tmp, "wb") as f:
            f.write(INDEX_MAGIC)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self.document_indices)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.frombuffer(self.document_indices, dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(idx_tmp, idx_path(self.prefix))
        self._closed = True

    def abort(self) -> None:
        """Close and delete the unfinished files."""
        if self._closed:
            return
        self._bin.close()
        for path in (self._bin_tmp, idx_path(self.prefix) + self._tmp_suffix):
            if os.path.exists(path):
                os.remove(path)
        self._closed = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class IndexedDataset:
    """Memory-mapped reader of ``PREFIX.bin/.idx``; ``ds[i]`` is sequence ``i`` as a numpy array."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for path in (ipath, bpath):
            if not os.path.isfile(path):
                hint = (f"; name the dataset by its prefix, {prefix[:-4]}, without .bin/.idx"
                        if prefix.endswith((".bin", ".idx")) else "")
                raise FileNotFoundError(f"indexed dataset file {path} does not exist{hint}")
        with open(ipath, "rb") as f:
            header = f.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[:9] != INDEX_MAGIC:
            raise ValueError(f"{ipath} is not a Megatron index file (bad magic {header[:9]!r})")
        version, code, seq_count, doc_count = struct.unpack("<QBQQ", header[9:])
        if version != INDEX_VERSION:
            raise ValueError(f"{ipath}: index version {version} is not supported (expected 1)")
        if code not in CODE_DTYPES:
            raise ValueError(f"{ipath}: unknown dtype code {code}")
        self.dtype = CODE_DTYPES[code]
        expected = HEADER_BYTES + seq_count * 12 + doc_count * 8
        size = os.path.getsize(ipath)
        if size < expected:
            raise ValueError(f"{ipath} is truncated: {size} bytes, the header promises {expected}")
        self._idx = np.memmap(ipath, mode="r", dtype=np.uint8)
        off = HEADER_BYTES
        self.sequence_lengths = np.frombuffer(self._idx, dtype=np.int32, count=seq_count, offset=off)
        off += seq_count * 4
        self.sequence_pointers = np.frombuffer(self._idx, dtype=np.int64, count=seq_count, offset=off)
        off += seq_count * 8
        self.document_indices = np.frombuffer(self._idx, dtype=np.int64, count=doc_count, offset=off)
        bin_size = os.path.getsize(bpath)
        need = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize if seq_count else 0
        if bin_size < need:
            raise ValueError(f"{bpath} is truncated: {bin_size} bytes, the index needs {need}")
        self._bin_map = np.memmap(bpath, mode="r", dtype=np.uint8) if bin_size else np.zeros(0, np.uint8)
        self._bin = memoryview(self._bin_map)  # np.frombuffer on a memoryview is the cheapest slice

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``i`` (a read-only view of the mmap)."""
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        if offset < 0 or length < 0 or offset + length > n:
            raise IndexError(f"tokens {offset}:{offset + length} out of range for sequence {i} of length {n}")
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, dtype=self.dtype, count=length, offset=start)

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self.sequence_lengths)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for a dataset of {n}")
        i = int(i) % n
        return np.frombuffer(self._bin, dtype=self.dtype, count=int(self.sequence_lengths[i]),
                             offset=int(self.sequence_pointers[i]))

    def document(self, d: int) -> list[np.ndarray]:
        """The sequences of document ``d``."""
        lo, hi = int(self.document_indices[d]), int(self.document_indices[d + 1])
        return [self.get(i) for i in range(lo, hi)]


def merge_indexed_datasets(prefixes: Iterable[str], output_prefix: str) -> IndexedDataset:
    """Concatenate several datasets (same dtype) into ``output_prefix``; returns the merged reader."""
    prefixes = list(prefixes)
    if not prefixes:
        raise ValueError("merge_indexed_datasets needs at least one input prefix")
    # every input opened (and its dtype checked) before any copying: a mistyped last prefix
    # fails at once, not after the others were copied
    dtypes = [IndexedDataset(p).dtype for p in prefixes]
    for prefix, dtype in zip(prefixes, dtypes):
        if dtype != dtypes[0]:
            raise ValueError(f"cannot merge {prefix} ({dtype}) into a {dtypes[0]} dataset")
    dtype = dtypes[0]
    with IndexedDatasetWriter(output_prefix, dtype) as writer:
        for prefix in prefixes:
            writer.add_index(prefix)
    return IndexedDataset(output_prefix)
