"""Weighted mixtures of datasets, the builder the training loop calls, and the mixture report.

Position ``i`` of a blend is served by the dataset whose sample count lags its weight the most
(greedy on the largest sampling error), so any prefix of the blend follows the weights to within
one sample per dataset.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from megallama.data.cache import cached_arrays
from megallama.data.gpt_dataset import (
    BLEND_SURPLUS,
    GPTDataset,
    default_cache_dir,
    parse_data_path,
    split_document_ranges,
)
from megallama.data.index_builders import build_blending_indices
from megallama.data.indexed import IndexedDataset

# LLaMA's pre-training data (Touvron et al. 2023, Table 1): sampling proportion (%) and the epochs
# each source saw over 1.4T tokens.
LLAMA_MIXTURE = {
    "CommonCrawl": (67.0, 1.10),
    "C4": (15.0, 1.06),
    "GitHub": (4.5, 0.64),
    "Wikipedia": (4.5, 2.45),
    "Books": (4.5, 2.23),
    "ArXiv": (2.5, 1.06),
    "StackExchange": (2.0, 1.03),
}

SPLIT_NAMES = ("train", "valid", "test")


class BlendedDataset:
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``; each item also carries
    ``dataset_id``."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, cache_dir: str | None = None,
                 description: dict | None = None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"BlendedDataset needs one weight per dataset, got {len(datasets)} datasets and {len(weights)} weights")
        total = float(sum(weights))
        if total <= 0 or any(w < 0 for w in weights):
            raise ValueError(f"blend weights must be >= 0 and not all zero, got {list(weights)}")
        self.datasets = list(datasets)
        self.weights = [w / total for w in weights]
        self.size = int(size)
        desc = dict(description or {}, weights=self.weights, size=self.size, sizes=[len(d) for d in datasets])
        arrays = cached_arrays(cache_dir, "blend", desc, ["dataset_index", "dataset_sample_index"],
                               lambda: dict(zip(("dataset_index", "dataset_sample_index"),
                                                build_blending_indices(self.weights, self.size))))
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        # The blend takes each dataset's samples in order 0, 1, 2, ...: the count is the need.
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, ds in enumerate(self.datasets):
            if counts[d] > len(ds):
                raise ValueError(f"the blend needs {counts[d]} samples of dataset {d} but it has {len(ds)}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} out of range for a blend of {self.size}")
        d = int(self.dataset_index[i])
        item = dict(self.datasets[d][int(self.dataset_sample_index[i])])
        item["dataset_id"] = d
        return item


def build_gpt_datasets(data_path: Sequence[str] | str, split: str, seq_length: int,
                       num_samples: Sequence[int | None], seed: int, cache_dir: str | None = None):
    """(train, valid, test) datasets for Megatron's ``--data-path`` and ``--split``.

    ``num_samples`` gives the samples each split must supply (``None``: one epoch of a single
    dataset). A split with a zero fraction or zero samples comes back as ``None``. Several
    prefixes are blended by weight; each is asked for its share plus a small surplus. Index caches
    go to ``cache_dir``, or ``cache/`` beside each dataset.
    """
    prefixes, weights = parse_data_path(data_path)
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must give (train, valid, test), got {num_samples}")
    indexed = [IndexedDataset(p) for p in prefixes]
    ranges = [split_document_ranges(len(ds), split) for ds in indexed]
    out = []
    for s, name in enumerate(SPLIT_NAMES):
        wanted = num_samples[s]
        if wanted == 0 or all(r[s][0] == r[s][1] for r in ranges):
            out.append(None)
            continue
        if len(prefixes) == 1:
            begin, end = ranges[0][s]
            out.append(GPTDataset(indexed[0], begin, end, wanted, seq_length, seed,
                                  cache_dir or default_cache_dir(prefixes[0]), name))
            continue
        if wanted is None:
            raise ValueError(f"a blend of {len(prefixes)} datasets needs a number of {name} samples")
        parts = []
        for ds, r, w, p in zip(indexed, ranges, weights, prefixes):
            begin, end = r[s]
            if end == begin:
                raise ValueError(f"{p} has no documents in the {name} split ({split!r}) but has weight {w:.4g}")
            share = int(math.ceil(math.ceil(wanted * w) * (1 + BLEND_SURPLUS)))
            parts.append(GPTDataset(ds, begin, end, share, seq_length, seed, cache_dir or default_cache_dir(p), name))
        description = {"prefixes": [os.path.basename(p) for p in prefixes], "split": split, "name": name,
                       "seq_length": seq_length, "seed": seed}
        out.append(BlendedDataset(parts, weights, wanted, cache_dir or default_cache_dir(prefixes[0]), description))
    return tuple(out)


def mixture_epochs(data_path: Sequence[str] | str, train_tokens: float) -> list[dict]:
    """For each source of ``--data-path``: its share, its token count, and the epochs it will see
    when ``train_tokens`` are drawn from the blend (the paper's Table 1 "epochs" column)."""
    prefixes, weights = parse_data_path(data_path)
    rows = []
    for p, w in zip(prefixes, weights):
        tokens = IndexedDataset(p).num_tokens
        drawn = w * train_tokens
        rows.append({"prefix": p, "weight": w, "tokens": tokens, "drawn_tokens": drawn,
                     "epochs": drawn / tokens if tokens else math.inf})
    return rows


def format_mixture_report(rows: list[dict]) -> str:
    """A table with columns as wide as their widest cell (1.4e12 drawn tokens is 17 characters)."""
    table = [("source", "share", "tokens", "drawn", "epochs")]
    table += [(os.path.basename(r["prefix"]), f"{100 * r['weight']:.2f}%", f"{r['tokens']:,d}",
               f"{r['drawn_tokens']:,.0f}", f"{r['epochs']:.2f}") for r in rows]
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))]
    return "\n".join(" ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])
                     for row in table)
