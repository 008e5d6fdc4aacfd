"""Python face of the C++ index builders (``megallama._data``).

The GPT sample index cuts the documents, laid end to end in shuffled order, into windows of
``seq_length + 1`` tokens; the blending index interleaves datasets to follow their weights. Both
produce the same arrays as megatron-core's ``helpers_cpp`` for the same inputs.
"""
from __future__ import annotations

import numpy as np
import torch  # noqa: F401  (the extension links against torch's libraries: import torch first)

from megallama import _data


def build_sample_idx(
    sizes: np.ndarray,
    document_idx: np.ndarray,
    seq_length: int,
    num_epochs: int,
    tokens_per_epoch: int,
    drop_last_partial_sequence: bool = True,
    add_extra_token_to_sequence: bool = True,
) -> np.ndarray:
    """``[num_samples + 1, 2]`` array of (position in ``document_idx``, token offset) sample starts.

    int32 when every value fits, else int64 (Megatron's rule).
    """
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    document_idx = np.ascontiguousarray(document_idx, dtype=np.int32)
    # offsets fit int32 because sizes are int32: only the document index length can need int64
    build = _data.build_sample_idx_int32 if document_idx.shape[0] <= np.iinfo(np.int32).max else _data.build_sample_idx_int64
    return build(sizes, document_idx, int(seq_length), int(num_epochs), int(tokens_per_epoch),
                 bool(drop_last_partial_sequence), int(bool(add_extra_token_to_sequence)))


def build_blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset int16[size], sample-within-dataset int64[size]) for normalised ``weights``."""
    return _data.build_blending_indices(np.asarray(weights, dtype=np.float64), int(size))


def build_exhaustive_blending_indices(sizes) -> tuple[np.ndarray, np.ndarray]:
    """Blending that takes exactly ``sizes[d]`` samples from dataset ``d``."""
    return _data.build_exhaustive_blending_indices(np.asarray(sizes, dtype=np.int64))
