"""C++ index builders against a plain numpy/Python reference and megatron-core's helpers_cpp."""
import numpy as np
import pytest

from megallama.data.index_builders import (
    build_blending_indices,
    build_exhaustive_blending_indices,
    build_sample_idx,
)

helpers_cpp = pytest.importorskip("megatron.core.datasets.helpers_cpp")


def reference_sample_idx(sizes, doc_idx, seq, num_epochs, tokens_per_epoch, drop_last, extra):
    """Sample i starts at global token i*seq; find its document by binary search over cumsums."""
    lengths = sizes[doc_idx].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    total_req = num_epochs * tokens_per_epoch - extra
    n = total_req // seq if drop_last else -(-total_req // seq)
    out = np.zeros((n + 1, 2), dtype=np.int64)
    for i in range(1, n + 1):
        b = i * seq
        if b > starts[-1] - extra:  # the kept partial last sample ends at the last token
            out[i] = (len(doc_idx) - 1, lengths[-1] - extra)
            continue
        # with the extra token the start lies in [start, end), without it in (start, end]
        k = np.searchsorted(starts, b, side="right" if extra else "left") - 1
        out[i] = (k, b - starts[k])
    return out


def reference_blending(weights, size):
    counts = [0] * len(weights)
    di, si = [], []
    for i in range(size):
        x = float(max(i, 1))
        errs = [w * x - c for w, c in zip(weights, counts)]
        best = int(np.argmax(errs))  # first maximum, as the greedy rule
        di.append(best)
        si.append(counts[best])
        counts[best] += 1
    return np.array(di, np.int16), np.array(si, np.int64)


def random_case(rng, allow_empty_docs):
    n = int(rng.integers(1, 60))
    sizes = rng.integers(0 if allow_empty_docs else 1, 80, size=n).astype(np.int32)
    sizes[0] = max(sizes[0], 3)
    epochs = int(rng.integers(1, 4))
    doc_idx = np.tile(np.arange(n, dtype=np.int32), epochs)
    rng.shuffle(doc_idx)
    return sizes, doc_idx, epochs, int(sizes.sum()), int(rng.integers(2, 50))


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("extra", [0, 1])
def test_sample_idx_matches_reference_and_megatron(drop_last, extra):
    rng = np.random.default_rng(10 + extra + 2 * drop_last)
    for trial in range(300):
        sizes, doc_idx, epochs, tpe, seq = random_case(rng, allow_empty_docs=trial % 2 == 1)
        if epochs * tpe - extra < seq:
            continue
        ours = build_sample_idx(sizes, doc_idx, seq, epochs, tpe, drop_last, bool(extra))
        assert ours.dtype == np.int32
        megatron = helpers_cpp.build_sample_idx_int32(sizes, doc_idx, seq, epochs, tpe, drop_last, extra)
        np.testing.assert_array_equal(ours, megatron)
        if trial % 2 == 0:  # Megatron records empty documents at their end; the reference skips them
            np.testing.assert_array_equal(ours, reference_sample_idx(sizes, doc_idx, seq, epochs, tpe, drop_last, extra))


def test_sample_idx_int64_variant_matches_megatron():
    from megallama import _data

    rng = np.random.default_rng(3)
    sizes, doc_idx, epochs, tpe, seq = random_case(rng, False)
    ours = _data.build_sample_idx_int64(sizes, doc_idx, seq, epochs, tpe, True, 1)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, helpers_cpp.build_sample_idx_int64(sizes, doc_idx, seq, epochs, tpe, True, 1))


def test_sample_idx_large_matches_megatron():
    rng = np.random.default_rng(4)
    sizes = rng.integers(1, 3000, size=200_000).astype(np.int32)
    doc_idx = np.tile(np.arange(len(sizes), dtype=np.int32), 2)
    rng.shuffle(doc_idx)
    tpe = int(sizes.sum())
    ours = build_sample_idx(sizes, doc_idx, 2048, 2, tpe)
    np.testing.assert_array_equal(ours, helpers_cpp.build_sample_idx_int32(sizes, doc_idx, 2048, 2, tpe, True, 1))


def test_blending_matches_reference_and_megatron():
    rng = np.random.default_rng(5)
    for n in [1, 2, 3, 7, 8, 9, 20]:
        weights = rng.random(n)
        weights /= weights.sum()
        size = 3000
        di, si = build_blending_indices(weights, size)
        ref_di, ref_si = reference_blending(list(weights), size)
        np.testing.assert_array_equal(di, ref_di)
        np.testing.assert_array_equal(si, ref_si)
        mc_di, mc_si = np.zeros(size, np.int16), np.zeros(size, np.int64)
        helpers_cpp.build_blending_indices(mc_di, mc_si, weights, n, size, False)
        np.testing.assert_array_equal(di, mc_di)
        np.testing.assert_array_equal(si, mc_si)
        # each dataset's samples are taken in order 0, 1, 2, ...
        for d in range(n):
            np.testing.assert_array_equal(si[di == d], np.arange((di == d).sum()))


def test_llama_mixture_blend_follows_weights():
    weights = np.array([67.0, 15.0, 4.5, 4.5, 4.5, 2.5, 2.0]) / 100
    size = 1_000_000
    di, _ = build_blending_indices(weights, size)
    mc_di, mc_si = np.zeros(size, np.int16), np.zeros(size, np.int64)
    helpers_cpp.build_blending_indices(mc_di, mc_si, weights, 7, size, False)
    np.testing.assert_array_equal(di, mc_di)
    assert np.abs(np.bincount(di, minlength=7) - weights * size).max() <= 1


def test_exhaustive_blending_matches_megatron():
    rng = np.random.default_rng(6)
    for _ in range(100):
        n = int(rng.integers(1, 12))
        sizes = rng.integers(1, 300, size=n)
        di, si = build_exhaustive_blending_indices(sizes)
        mc_di, mc_si = np.zeros(sizes.sum(), np.int16), np.zeros(sizes.sum(), np.int64)
        helpers_cpp.build_exhaustive_blending_indices(mc_di, mc_si, sizes, n)
        np.testing.assert_array_equal(di, mc_di)
        np.testing.assert_array_equal(si, mc_si)
        np.testing.assert_array_equal(np.bincount(di, minlength=n), sizes)


def test_bad_arguments_raise_not_abort():
    sizes = np.array([5, 5], np.int32)
    doc_idx = np.array([0, 1], np.int32)
    with pytest.raises(ValueError, match="seq_length must be at least 2"):
        build_sample_idx(sizes, doc_idx, 1, 1, 10)
    with pytest.raises(ValueError, match="num_epochs"):
        build_sample_idx(sizes, doc_idx, 4, 0, 10)
    with pytest.raises(ValueError, match="not a valid document"):
        build_sample_idx(sizes, np.array([0, 7], np.int32), 4, 1, 10)
    with pytest.raises(ValueError, match="too few"):
        build_sample_idx(sizes, doc_idx, 4, 3, 10)  # claims 30 tokens, the documents hold 10
    with pytest.raises(ValueError, match="document_idx is empty"):
        build_sample_idx(sizes, np.array([], np.int32), 4, 1, 10)
    with pytest.raises(ValueError, match="non-negative"):
        build_blending_indices([0.5, -0.5], 10)
    with pytest.raises(ValueError, match="size must be"):
        build_blending_indices([1.0], -1)
    with pytest.raises(ValueError, match="sum to zero"):
        build_exhaustive_blending_indices([0, 0])
