"""The two phases of the cross-entropy over vocabulary-parallel logits: cross_entropy_partials and
cross_entropy_grad_from_stats_, against their references and, composed over two ranks by hand,
against the single-rank cross_entropy_unit_grad_."""
import pytest
import torch

from megallama import ops
from megallama.ops import kernels
from megallama.ops._ext import _ops
from tests.ops.conftest import TOL

IGNORE = -100
TOLS = {**TOL, torch.float16: dict(rtol=1e-3, atol=1e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _local_case(rows, width, valid, dtype, seed=0):
    """Logits [rows, width] whose columns from `valid` on are padding (NaN and inf: they must take no
    part), and local targets in [0, valid) or -1."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, width, generator=g, dtype=torch.float64)).to(dtype)
    logits[::2, valid:] = float("nan")
    logits[1::2, valid:] = float("inf")
    target = torch.randint(0, max(valid, 1), (rows,), generator=g) if valid else torch.full((rows,), -1)
    target[::3] = -1
    return logits, target


def _widths():
    return [(w, v) for w in (1, 7, 1000) for v in sorted({w, w - 3, 0}) if v >= 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width,valid", _widths())
def test_partials_match_reference(width, valid, dtype):
    logits, target = _local_case(9, width, valid, dtype)
    stats = ops.cross_entropy_partials(logits, target, valid)
    want = ops.cross_entropy_partials_ref(logits, target, valid)
    assert stats.dtype == _acc(dtype) and stats.shape == (9, 3) and stats.is_contiguous()
    torch.testing.assert_close(stats, want, **TOL[stats.dtype])
    if valid == 0:
        assert (stats[:, 0] == float("-inf")).all() and not stats[:, 1:].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width,valid", _widths())
def test_grad_from_stats_matches_reference(width, valid, dtype):
    logits, target = _local_case(9, width, valid, dtype)
    stats = ops.cross_entropy_partials_ref(logits, target, valid)
    row_max = stats[:, 0].contiguous()
    row_scale = torch.where(target >= 0, 1 / stats[:, 1], 0)
    row_scale[1] = 0.5  # a row with no target here whose other columns still count
    ours, ref = logits.clone(), logits.clone()
    ops.cross_entropy_grad_from_stats_(ours, target, valid, row_max, row_scale)
    ops.cross_entropy_grad_from_stats_ref_(ref, target, valid, row_max, row_scale)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, **TOLS[dtype])
    assert not ours[:, valid:].any()


def test_reference_partials_give_logsumexp_float64():
    logits, target = _local_case(6, 50, 41, torch.float64)
    stats = ops.cross_entropy_partials_ref(logits, target, 41)
    torch.testing.assert_close(stats[:, 0] + stats[:, 1].log(), logits[:, :41].logsumexp(-1))
    rows = target >= 0
    assert torch.equal(stats[rows, 2], logits[rows, target[rows]])


def _split(logits, target, ranks, width):
    """Rank r's [T, width] slice of the vocabulary (the last one padded with garbage columns), its
    valid column count and its local targets."""
    vocab = logits.shape[1]
    parts = []
    for r in range(ranks):
        start = r * width
        valid = min(max(vocab - start, 0), width)
        local = torch.full((logits.shape[0], width), float("nan"), dtype=logits.dtype)
        local[:, :valid] = logits[:, start:start + valid]
        shifted = target - start
        mine = (target != IGNORE) & (shifted >= 0) & (shifted < valid)
        parts.append((local, torch.where(mine, shifted, -1), valid))
    return parts


def _vocab_parallel(logits, target, ranks, width):
    """(loss, gradient [T, V]) of the two phases over `ranks` ranks, the all-reduces done by hand."""
    parts = _split(logits, target, ranks, width)
    stats = torch.stack([ops.cross_entropy_partials(*p) for p in parts])
    row_max = stats[:, :, 0].amax(0)
    sum_exp = (stats[:, :, 1] * (stats[:, :, 0] - row_max).exp()).sum(0)
    target_logit = stats[:, :, 2].sum(0)
    counts = target != IGNORE
    loss = torch.where(counts, row_max + sum_exp.log() - target_logit, 0)
    scale = torch.where(counts, 1 / sum_exp, 0)
    for local, local_target, valid in parts:
        ops.cross_entropy_grad_from_stats_(local, local_target, valid, row_max, scale)
        assert not local[:, valid:].any()
    grad = torch.cat([p[0] for p in parts], 1)[:, :logits.shape[1]]
    return loss, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("vocab,width", [(2, 3), (7, 5), (13, 7), (1000, 503), (1994, 1000)])
def test_two_ranks_compose_to_the_single_rank_op(vocab, width, dtype):
    g = torch.Generator().manual_seed(vocab)
    logits = (3 * torch.randn(8, vocab, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, vocab, (8,), generator=g)
    target[[1, 6]] = IGNORE
    target[2] = vocab - 1  # on the padded rank
    loss, grad = _vocab_parallel(logits, target, 2, width)
    want_grad = logits.clone()
    want_loss = ops.cross_entropy_unit_grad_(want_grad, target, IGNORE)
    torch.testing.assert_close(loss, want_loss, **TOL[want_loss.dtype])
    torch.testing.assert_close(grad, want_grad, **TOL[dtype])
    assert not grad[[1, 6]].any()


def test_ignored_rows_with_no_finite_logit_become_zeros():
    """A row whose max is -inf everywhere, given scale 0 and no target: zeros, not NaN."""
    logits = torch.randn(3, 6)
    logits[1] = float("-inf")
    target = torch.tensor([2, IGNORE, 4])
    for fn in (ops.cross_entropy_partials, ops.cross_entropy_partials_ref):
        stats = fn(logits[:, :4], torch.tensor([2, -1, -1]), 4)
        assert stats[1, 0] == float("-inf") and stats[1, 1] == 0
    loss, grad = _vocab_parallel(logits, target, 2, 3)
    assert loss[1] == 0 and torch.isfinite(grad).all() and not grad[1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows_and_targets(dtype):
    """Rows as a column slice of a wider buffer: read (phase 1) and written in place (phase 2), the
    rest of the buffer kept; a strided target_local."""
    buf, target = _local_case(5, 300, 200, dtype)
    buf[:, 200:] = torch.randn(5, 100).to(dtype)
    view = buf[:, 50:250]
    target = torch.stack([target, target], 1)[:, 0]
    expected = view.contiguous()
    stats = ops.cross_entropy_partials(view, target, 190)
    torch.testing.assert_close(stats, ops.cross_entropy_partials_ref(expected, target, 190))
    row_max, row_scale = stats[:, 0].contiguous(), 1 / stats[:, 1]
    before = buf.clone()
    ops.cross_entropy_grad_from_stats_ref_(expected, target, 190, row_max, row_scale)
    ops.cross_entropy_grad_from_stats_(view, target, 190, row_max, row_scale)
    assert view.stride() == (300, 1)
    torch.testing.assert_close(buf[:, 50:250], expected, **TOL[dtype])
    assert torch.equal(buf[:, :50], before[:, :50]) and torch.equal(buf[:, 250:], before[:, 250:])


def test_empty_rows():
    empty, target = torch.empty(0, 9), torch.empty(0, dtype=torch.int64)
    assert ops.cross_entropy_partials(empty, target, 9).shape == (0, 3)
    ops.cross_entropy_grad_from_stats_(empty, target, 9, torch.empty(0), torch.empty(0))


def test_fallback_path_equals_kernel(monkeypatch):
    logits, target = _local_case(6, 33, 30, torch.bfloat16)
    stats = ops.cross_entropy_partials(logits, target, 30)
    row_max, row_scale = stats[:, 0].contiguous(), torch.where(target >= 0, 1 / stats[:, 1], 0)
    ours = logits.clone()
    ops.cross_entropy_grad_from_stats_(ours, target, 30, row_max, row_scale)
    monkeypatch.setattr(kernels, "_use_kernel", lambda t: False)
    torch.testing.assert_close(ops.cross_entropy_partials(logits, target, 30), stats)
    ref = logits.clone()
    ops.cross_entropy_grad_from_stats_(ref, target, 30, row_max, row_scale)
    torch.testing.assert_close(ref, ours, **TOL[torch.bfloat16])


def test_multithreaded_equals_single_threaded(restore_threads):
    logits, target = _local_case(64, 1000, 997, torch.bfloat16)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        stats = ops.cross_entropy_partials(logits, target, 997)
        grad = logits.clone()
        ops.cross_entropy_grad_from_stats_(grad, target, 997, stats[:, 0].contiguous(), 1 / stats[:, 1])
        results.append((stats, grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def _zeros(rows):
    return torch.zeros(rows, dtype=torch.int64)


def _stats_args(rows=2):
    return torch.zeros(rows), torch.ones(rows)


@pytest.mark.parametrize("bad", [4, -2, 10])
def test_bad_target_raises_and_leaves_logits_untouched(bad):
    logits, target = _local_case(4, 6, 4, torch.float32)
    target[2] = bad
    with pytest.raises(RuntimeError, match=rf"cross_entropy_partials: target_local\[2\] = {bad} is outside "
                                           r"\[-1, 4\)"):
        ops.cross_entropy_partials(logits, target, 4)
    before = logits.clone()
    with pytest.raises(RuntimeError, match=rf"target_local\[2\] = {bad} is outside \[-1, 4\)"):
        ops.cross_entropy_grad_from_stats_(logits, target, 4, *_stats_args(4))
    torch.testing.assert_close(logits, before, rtol=0, atol=0, equal_nan=True)


def _grad(logits=None, target=None, valid=4, row_max=None, row_scale=None):
    logits = torch.randn(2, 4) if logits is None else logits
    target = _zeros(2) if target is None else target
    default_max, default_scale = _stats_args()
    return lambda: _ops.cross_entropy_grad_from_stats(
        logits, target, valid, default_max if row_max is None else row_max,
        default_scale if row_scale is None else row_scale)


BAD_CALLS = [
    ("logits must be 2-D", lambda: _ops.cross_entropy_partials(torch.randn(2, 3, 4), _zeros(2), 4)),
    ("logits must be float32, float64, bfloat16 or float16",
     lambda: _ops.cross_entropy_partials(torch.ones(2, 4, dtype=torch.int32), _zeros(2), 4)),
    ("stride 1", lambda: _ops.cross_entropy_partials(torch.randn(4, 2).t(), _zeros(2), 2)),
    ("target_local must be int64",
     lambda: _ops.cross_entropy_partials(torch.randn(2, 4), torch.zeros(2, dtype=torch.int32), 4)),
    ("target_local must have shape \\[2\\]",
     lambda: _ops.cross_entropy_partials(torch.randn(2, 4), _zeros(3), 4)),
    ("valid_columns must lie in \\[0, 4\\]", lambda: _ops.cross_entropy_partials(torch.randn(2, 4), _zeros(2), 5)),
    ("valid_columns must lie in \\[0, 4\\]", _grad(valid=-1)),
    ("row_max must have shape \\[2\\]", _grad(row_max=torch.zeros(3))),
    ("row_scale must be Float for Float logits", _grad(row_scale=torch.ones(2, dtype=torch.float64))),
    ("row_max must be Double for Double logits", _grad(logits=torch.randn(2, 4, dtype=torch.float64))),
    ("row_scale must be contiguous", _grad(row_scale=torch.ones(2, 2)[:, 0])),
    ("single memory location", _grad(logits=torch.randn(1, 4).expand(2, 4))),
]


@pytest.mark.parametrize("message,call", BAD_CALLS, ids=[m for m, _ in BAD_CALLS])
def test_bad_input_raises_clear_error(message, call):
    with pytest.raises(RuntimeError, match=message):
        call()
