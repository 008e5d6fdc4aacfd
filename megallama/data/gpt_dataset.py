"""GPT training samples: documents shuffled over epochs and cut into ``seq_length + 1`` windows.

Three index arrays, as in Megatron: the document index (the split's documents repeated once per
epoch and shuffled), the sample index (where each window starts, built in C++) and the shuffle
index (the order windows are served in). They are cached as ``.npy`` beside the data, under a hash
of everything that determines them, so a restart memory-maps instead of rebuilding.
"""
from __future__ import annotations

import math
import os
import re
from typing import Sequence

import numpy as np

from megallama.data.cache import cached_arrays
from megallama.data.index_builders import build_sample_idx
from megallama.data.indexed import IndexedDataset

INDEX_FORMAT_VERSION = 1
# A last epoch needed for fewer than this share of its samples is shuffled on its own, so that
# its documents are not spread over (and over-represented in) the whole run (Megatron's rule).
SEPARATE_LAST_EPOCH_THRESHOLD = 0.80
# Each blended dataset is asked for this many more samples than its share, so the greedy blend
# never runs past its end (Megatron's default surplus).
BLEND_SURPLUS = 0.005


def parse_split(split: str) -> list[float]:
    """Megatron's ``--split``: ``"969,30,1"`` (or ``/``-separated, or fewer parts) → normalised
    [train, valid, test] fractions."""
    parts = [float(p) for p in re.findall(r"[.0-9]+", split)]
    if not parts or len(parts) > 3:
        raise ValueError(f"--split {split!r}: expected 1 to 3 numbers such as '969,30,1'")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    if total <= 0:
        raise ValueError(f"--split {split!r} sums to zero")
    return [p / total for p in parts]


def split_document_ranges(num_documents: int, split: str) -> list[tuple[int, int]]:
    """[begin, end) document range of train, valid and test, rounded as Megatron does."""
    fractions = parse_split(split)
    bounds = [0.0]
    for f in fractions:
        bounds.append(bounds[-1] + f)
    edges = [int(round(b * float(num_documents))) for b in bounds]
    edges[-1] = num_documents
    return [(edges[i], edges[i + 1]) for i in range(3)]


def parse_data_path(data_path: Sequence[str] | str) -> tuple[list[str], list[float]]:
    """``--data-path`` as Megatron reads it: one prefix, or ``W1 PREFIX1 W2 PREFIX2 …``.

    Returns (prefixes, weights normalised to sum to 1).
    """
    items = data_path.split() if isinstance(data_path, str) else [t for p in data_path for t in str(p).split()]
    if not items:
        raise ValueError("--data-path is empty")
    if len(items) == 1:
        return items, [1.0]
    if len(items) % 2:
        raise ValueError(f"--data-path {' '.join(items)!r}: expected one prefix or weight/prefix pairs")
    weights, prefixes = [], []
    for w, p in zip(items[0::2], items[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"--data-path: {w!r} should be the weight of {p!r}") from None
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"--data-path: weight {w} of {p!r} must be finite and >= 0")
        weights.append(weight)
        prefixes.append(p)
    total = sum(weights)
    if total <= 0:
        raise ValueError("--data-path weights sum to zero")
    return prefixes, [w / total for w in weights]


def default_cache_dir(prefix: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")


class GPTDataset:
    """Samples of ``seq_length`` tokens from documents ``[doc_begin, doc_end)`` of an indexed dataset.

    ``ds[i]`` → ``{"tokens": int64[seq_length], "labels": int64[seq_length]}`` with ``labels`` the
    tokens shifted left by one (window ``seq_length + 1``). ``len(ds)`` counts every sample of the
    epochs built, at least ``num_samples``; ``num_samples=None`` builds one epoch.
    """

    def __init__(self, indexed: IndexedDataset, doc_begin: int, doc_end: int, num_samples: int | None,
                 seq_length: int, seed: int, cache_dir: str | None = None, name: str = "train"):
        if not 0 <= doc_begin < doc_end <= len(indexed):
            raise ValueError(f"document range [{doc_begin}, {doc_end}) is empty or outside the {len(indexed)} documents of {indexed.prefix}")
        if seq_length < 1:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        self.indexed = indexed
        self.seq_length = seq_length
        self.name = name
        sizes = indexed.sequence_lengths
        self.tokens_per_epoch = int(sizes[doc_begin:doc_end].sum(dtype=np.int64))
        if self.tokens_per_epoch <= seq_length:
            raise ValueError(f"{name} split of {indexed.prefix} holds {self.tokens_per_epoch} tokens, "
                             f"not enough for one sample of {seq_length} + 1")
        self.num_epochs = self._num_epochs(num_samples)
        description = {
            "class": "GPTDataset", "version": INDEX_FORMAT_VERSION, "prefix": os.path.basename(indexed.prefix),
            "num_sequences": len(indexed), "num_tokens": indexed.num_tokens, "split": name,
            "doc_begin": doc_begin, "doc_end": doc_end, "num_samples": num_samples,
            "seq_length": seq_length, "seed": seed,
        }
        arrays = cached_arrays(cache_dir, f"gpt_{name}", description, ["document_index", "sample_index", "shuffle_index"],
                               lambda: self._build(doc_begin, doc_end, num_samples, seed))
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _num_epochs(self, num_samples: int | None) -> int:
        if num_samples is None:
            return 1
        needed = num_samples * self.seq_length + 1
        return max(1, -(-needed // self.tokens_per_epoch))

    def _build(self, doc_begin: int, doc_end: int, num_samples: int | None, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        documents = np.arange(doc_begin, doc_end, dtype=np.int32)
        epochs = self.num_epochs
        separate_last = False
        if num_samples is not None and epochs > 1:
            per_epoch = (self.tokens_per_epoch - 1) // self.seq_length
            before_last = ((epochs - 1) * self.tokens_per_epoch - 1) // self.seq_length
            separate_last = num_samples - before_last < SEPARATE_LAST_EPOCH_THRESHOLD * per_epoch
        if separate_last:
            head = np.tile(documents, epochs - 1)
            rng.shuffle(head)
            tail = documents.copy()
            rng.shuffle(tail)
            document_index = np.concatenate([head, tail])
        else:
            document_index = np.tile(documents, epochs)
            rng.shuffle(document_index)
        sample_index = build_sample_idx(self.indexed.sequence_lengths, document_index, self.seq_length,
                                        epochs, self.tokens_per_epoch)
        total = sample_index.shape[0] - 1
        dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
        if separate_last:
            first = ((epochs - 1) * self.tokens_per_epoch - 1) // self.seq_length
            shuffle_index = np.concatenate([rng.permutation(first).astype(dtype),
                                            (first + rng.permutation(total - first)).astype(dtype)])
        else:
            shuffle_index = rng.permutation(total).astype(dtype)
        return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}

    def __len__(self) -> int:
        return int(self.shuffle_index.shape[0])

    def window(self, i: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of sample ``i`` (after shuffling), as int64."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for the {len(self)} samples of {self.name}")
        j = int(self.shuffle_index[i])
        (doc_a, off_a), (doc_b, off_b) = self.sample_index[j], self.sample_index[j + 1]
        doc_a, off_a, doc_b, off_b = int(doc_a), int(off_a), int(doc_b), int(off_b)
        get, docs = self.indexed.get, self.document_index
        if doc_a == doc_b:
            return get(int(docs[doc_a]), off_a, off_b - off_a + 1).astype(np.int64)
        pieces = [get(int(docs[doc_a]), off_a)]
        pieces += [get(int(docs[k])) for k in range(doc_a + 1, doc_b)]
        pieces.append(get(int(docs[doc_b]), 0, off_b + 1))
        return np.concatenate(pieces).astype(np.int64)

    def __getitem__(self, i: int) -> dict:
        window = self.window(int(i))
        return {"tokens": window[:-1], "labels": window[1:]}


class MockGPTDataset:
    """Synthetic samples for ``--mock-data``: sample ``i`` depends only on (seed, i), so any rank
    or restart sees the same tokens for the same global sample number."""

    def __init__(self, seq_length: int, vocab_size: int, num_samples: int, seed: int = 0):
        if seq_length < 1 or vocab_size < 2 or num_samples < 0:
            raise ValueError(f"MockGPTDataset needs seq_length >= 1, vocab_size >= 2, num_samples >= 0; "
                             f"got {seq_length}, {vocab_size}, {num_samples}")
        self.seq_length, self.vocab_size, self.num_samples, self.seed = seq_length, vocab_size, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} mock samples")
        window = np.random.default_rng([self.seed, int(i)]).integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64)
        return {"tokens": window[:-1], "labels": window[1:]}
