"""Packed finetuning samples: several instruction examples per row, isolated from each other.

An example is one conversation of ``n`` tokens from ``tools/preprocess_instructions.py`` (ids and a
loss mask with the same document boundaries); it gives ``n − 1`` training positions (inputs
``ids[:-1]``, labels ``ids[1:]``, loss mask ``mask[1:]``). Rows of ``seq_length`` positions are
filled first-fit-decreasing over windows of :data:`PACKING_WINDOW` examples of the epoch's shuffled
order (near-complete rows, order still random); ``position_ids`` restart at 0 at each example, so
the model neither attends across nor continues positions over a boundary, and the rest of a row
is padding (its own "example", loss mask 0). An example longer than a row is cut to its first
``seq_length`` positions (counted in ``truncated``). The packing is cached beside the data like
``GPTDataset``'s indices.

:class:`EODResetDataset` gives pretraining samples the same fields, with examples ending at EOD
(Megatron's ``--reset-position-ids --reset-attention-mask --eod-mask-loss``).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from megallama.data.blended import BlendedDataset
from megallama.data.cache import cached_arrays
from megallama.data.gpt_dataset import (BLEND_SURPLUS, default_cache_dir, parse_data_path,
                                        split_document_ranges)
from megallama.data.indexed import IndexedDataset
from megallama.data.instructions import output_prefixes

PACKING_VERSION = 1
PACKING_WINDOW = 1000


def pack_first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Indices into ``lengths`` grouped into bins of total length ≤ ``capacity`` (first fit,
    longest first); each length must be ≤ capacity."""
    order = np.argsort(-lengths, kind="stable")
    free = np.empty(0, dtype=np.int64)
    bins: list[list[int]] = []
    for i in order:
        fits = np.flatnonzero(free >= lengths[i])
        if fits.size:
            free[fits[0]] -= lengths[i]
            bins[fits[0]].append(int(i))
        else:
            free = np.append(free, capacity - lengths[i])
            bins.append([int(i)])
    return [np.asarray(b, dtype=np.int64) for b in bins]


class PackedSFTDataset:
    """Rows of ``seq_length`` positions packed from examples ``[doc_begin, doc_end)``.

    ``ds[i]`` → ``tokens``, ``labels``, ``position_ids`` (int64 [seq_length]) and ``loss_mask``
    (float32 [seq_length]). Epochs are added until there are ``num_samples`` rows (one epoch for
    ``None``); each epoch reshuffles the examples before packing and shuffles its rows.
    """

    def __init__(self, tokens: IndexedDataset, loss_mask: IndexedDataset, doc_begin: int, doc_end: int,
                 num_samples: int | None, seq_length: int, seed: int, pad_id: int,
                 cache_dir: str | None = None, name: str = "train"):
        if len(tokens) != len(loss_mask) or not np.array_equal(tokens.sequence_lengths, loss_mask.sequence_lengths):
            raise ValueError(f"{tokens.prefix} and {loss_mask.prefix} do not hold the same documents "
                             "(ids and loss mask must come from one preprocess_instructions run)")
        if not 0 <= doc_begin < doc_end <= len(tokens):
            raise ValueError(f"example range [{doc_begin}, {doc_end}) is empty or outside the {len(tokens)} "
                             f"examples of {tokens.prefix}")
        if seq_length < 1:
            raise ValueError(f"seq_length must be positive, got {seq_length}")
        self.tokens, self.loss_mask = tokens, loss_mask
        self.seq_length, self.pad_id, self.name = seq_length, pad_id, name
        positions = tokens.sequence_lengths[doc_begin:doc_end].astype(np.int64) - 1
        usable = np.flatnonzero(positions > 0) + doc_begin  # a one-token example has nothing to predict
        if usable.size == 0:
            raise ValueError(f"the {name} split of {tokens.prefix} has no example of two or more tokens")
        self.truncated = int((positions > seq_length).sum())
        description = {"class": "PackedSFTDataset", "version": PACKING_VERSION,
                       "prefix": os.path.basename(tokens.prefix), "num_sequences": len(tokens),
                       "num_tokens": tokens.num_tokens, "split": name, "doc_begin": doc_begin,
                       "doc_end": doc_end, "num_samples": num_samples, "seq_length": seq_length, "seed": seed,
                       "window": PACKING_WINDOW}
        arrays = cached_arrays(cache_dir, f"sft_{name}", description, ["row_starts", "row_examples"],
                               lambda: self._build(usable, num_samples, seed))
        self.row_starts, self.row_examples = arrays["row_starts"], arrays["row_examples"]

    def _build(self, examples: np.ndarray, num_samples: int | None, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        lengths = np.minimum(self.tokens.sequence_lengths.astype(np.int64) - 1, self.seq_length)
        rows: list[np.ndarray] = []
        while not rows or (num_samples is not None and len(rows) < num_samples):
            order = rng.permutation(examples)
            epoch = []
            for start in range(0, order.size, PACKING_WINDOW):
                window = order[start:start + PACKING_WINDOW]
                epoch += [window[b] for b in pack_first_fit_decreasing(lengths[window], self.seq_length)]
            rows += [epoch[i] for i in rng.permutation(len(epoch))]
            if num_samples is None:
                break
        sizes = np.asarray([r.size for r in rows], dtype=np.int64)
        return {"row_starts": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                "row_examples": np.concatenate(rows).astype(np.int64)}

    def __len__(self) -> int:
        return int(self.row_starts.shape[0] - 1)

    def examples(self, i: int) -> np.ndarray:
        """The example (document) numbers packed into row ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for the {len(self)} packed rows of {self.name}")
        return self.row_examples[self.row_starts[i]:self.row_starts[i + 1]]

    def __getitem__(self, i: int) -> dict:
        s = self.seq_length
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        at = 0
        for doc in self.examples(int(i)):
            n = min(int(self.tokens.sequence_lengths[doc]) - 1, s)
            ids = self.tokens.get(int(doc), 0, n + 1)
            tokens[at:at + n] = ids[:-1]
            labels[at:at + n] = ids[1:]
            loss_mask[at:at + n] = self.loss_mask.get(int(doc), 1, n)
            position_ids[at:at + n] = np.arange(n)
            at += n
        position_ids[at:] = np.arange(s - at)  # padding: one more example that nothing attends to
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


def truncation_notice(prefix: str, seq_length: int) -> str | None:
    """What packing into ``seq_length`` rows cuts from the instruction set ``prefix``, in one line
    (None: nothing). The cut is silent in training itself; an example whose answer starts past the
    cut trains nothing at all."""
    ids, mask = (IndexedDataset(p) for p in output_prefixes(prefix))
    long = np.flatnonzero(ids.sequence_lengths.astype(np.int64) - 1 > seq_length)
    if long.size == 0:
        return None
    untrained = sum(not mask.get(int(doc), 1, seq_length).any() for doc in long)
    return (f"{long.size:,} of {len(ids):,} examples in {prefix} are longer than --seq-length {seq_length} and are "
            f"cut to their first {seq_length} positions" + (f"; {untrained:,} of them keep no answer token and train "
                                                             "nothing" if untrained else ""))


def build_sft_datasets(sft_data_path: Sequence[str] | str, split: str, seq_length: int,
                       num_samples: Sequence[int | None], seed: int, pad_id: int, cache_dir: str | None = None):
    """(train, valid, test) packed datasets for ``--sft-data-path`` (``PREFIX`` or ``W1 PREFIX1 W2
    PREFIX2 …``, each the ``--output-prefix`` of preprocess_instructions) and ``--split``; a split
    with no examples or no samples asked for is None."""
    prefixes, weights = parse_data_path(sft_data_path)
    pairs = [tuple(IndexedDataset(p) for p in output_prefixes(prefix)) for prefix in prefixes]
    out = []
    for s, name in enumerate(("train", "valid", "test")):
        wanted = num_samples[s]
        ranges = [split_document_ranges(len(ids), split)[s] for ids, _ in pairs]
        if wanted == 0 or all(b == e for b, e in ranges):
            out.append(None)
            continue
        parts = []
        for (ids, mask), (begin, end), prefix, w in zip(pairs, ranges, prefixes, weights):
            if begin == end:
                raise ValueError(f"{prefix} has no examples in the {name} split ({split!r}) but has weight {w:.4g}")
            share = wanted if len(prefixes) == 1 or wanted is None else \
                int(math.ceil(math.ceil(wanted * w) * (1 + BLEND_SURPLUS)))
            parts.append(PackedSFTDataset(ids, mask, begin, end, share, seq_length, seed, pad_id,
                                          cache_dir or default_cache_dir(prefix), name))
        if len(parts) == 1:
            out.append(parts[0])
            continue
        if wanted is None:
            raise ValueError(f"a blend of {len(prefixes)} instruction sets needs a number of {name} samples")
        description = {"sft_prefixes": [os.path.basename(p) for p in prefixes], "split": split, "name": name,
                       "seq_length": seq_length, "seed": seed}
        out.append(BlendedDataset(parts, weights, wanted, cache_dir or default_cache_dir(prefixes[0]), description))
    return tuple(out)


class EODResetDataset:
    """Pretraining samples with Megatron's document handling: with ``reset_documents`` positions
    restart after each EOD token (attention too: the model isolates what ``position_ids`` delimit);
    with ``eod_mask_loss`` positions whose input is EOD carry no loss."""

    def __init__(self, dataset, eod: int, reset_documents: bool, eod_mask_loss: bool):
        self.dataset, self.eod = dataset, eod
        self.reset_documents, self.eod_mask_loss = reset_documents, eod_mask_loss

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        tokens = np.asarray(item["tokens"])
        if self.reset_documents:
            starts = np.zeros(tokens.size, dtype=bool)
            starts[0] = True
            starts[1:] = tokens[:-1] == self.eod
            index = np.arange(tokens.size)
            item["position_ids"] = index - np.maximum.accumulate(np.where(starts, index, 0))
        item["loss_mask"] = (tokens != self.eod).astype(np.float32) if self.eod_mask_loss else \
            np.ones(tokens.size, dtype=np.float32)
        return item
