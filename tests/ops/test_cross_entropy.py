import pytest
import torch
import torch.nn.functional as F

from megallama import ops
from megallama.ops import kernels
from megallama.ops._ext import _ops
from tests.ops.conftest import TOL

IGNORE = -100
TOLS = {**TOL, torch.float16: dict(rtol=1e-3, atol=1e-3)}  # one float16 rounding of values in [-1, 1]


def _case(rows, classes, dtype, ignored=(), scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(rows, classes, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, classes, (rows,), generator=g)
    target[list(ignored)] = IGNORE
    return logits, target


def _both(logits, target):
    """(loss, grad) of the op and of the reference, each on its own copy of logits."""
    ours, ref = logits.clone(), logits.clone()
    return (ops.cross_entropy_unit_grad_(ours, target, IGNORE), ours,
            ops.cross_entropy_unit_grad_ref(ref, target, IGNORE), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("classes", [1, 7, 1000, 32000])
def test_matches_reference(classes, dtype):
    rows = 3 if classes == 32000 else 9
    logits, target = _case(rows, classes, dtype, ignored=(1,))
    loss, grad, ref_loss, ref_grad = _both(logits, target)
    assert loss.dtype == ref_loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.shape == (rows,) and loss.is_contiguous()
    assert grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, **TOLS[loss.dtype])
    torch.testing.assert_close(grad, ref_grad, **TOLS[dtype])


def test_reference_matches_torch_cross_entropy():
    logits, target = _case(6, 50, torch.float64, ignored=(0, 4))
    want = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(ops.cross_entropy_unit_grad_ref(logits.clone(), target, IGNORE), want)


def test_gradient_is_autograd_of_cross_entropy_float64():
    """The written rows are d loss_t / d logits for a unit upstream gradient, as autograd has it."""
    logits, target = _case(8, 37, torch.float64, ignored=(2, 5))
    leaf = logits.clone().requires_grad_()
    want_loss = F.cross_entropy(leaf, target, ignore_index=IGNORE, reduction="none")
    want_loss.backward(torch.ones_like(want_loss))
    grad = logits.clone()
    loss = ops.cross_entropy_unit_grad_(grad, target, IGNORE)
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-12, atol=1e-12)


def test_ignored_rows_are_zero_even_with_non_finite_logits():
    logits, target = _case(4, 10, torch.float32)
    logits[1] = float("nan")
    logits[3, 2] = float("inf")
    target[1] = target[3] = IGNORE
    loss, grad, ref_loss, ref_grad = _both(logits, target)
    for l, g in ((loss, grad), (ref_loss, ref_grad)):
        assert l[1] == l[3] == 0 and not g[1].any() and not g[3].any()
        assert torch.isfinite(l).all() and torch.isfinite(g).all()


def test_masked_logits_get_zero_probability():
    """-inf logits (e.g. a padded vocabulary) give exactly 0 before the one-hot, not exp(-87)."""
    logits, target = _case(3, 64, torch.float32)
    logits[:, 40:] = float("-inf")
    target.clamp_(max=39)
    loss, grad, ref_loss, ref_grad = _both(logits, target)
    torch.testing.assert_close(loss, ref_loss)
    assert not grad[:, 40:].any()
    torch.testing.assert_close(grad, ref_grad)


def test_extreme_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0, 80.0], [-200.0, -150.0, -100.0, -90.0]])
    target = torch.tensor([1, 0])
    loss, grad, ref_loss, ref_grad = _both(logits, target)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_on_strided_rows(dtype):
    """Rows as a column slice of a wider buffer: written in place, the rest of the buffer kept."""
    buf, target = _case(5, 300, dtype, ignored=(3,))
    view = buf[:, 50:250]
    target.clamp_(max=199)
    target[3] = IGNORE
    before = buf.clone()
    expected = view.contiguous()
    want_loss = ops.cross_entropy_unit_grad_ref(expected, target, IGNORE)
    ptr = view.data_ptr()
    loss = ops.cross_entropy_unit_grad_(view, target, IGNORE)
    assert view.data_ptr() == ptr and view.stride() == (300, 1)
    torch.testing.assert_close(loss, want_loss, **TOL[torch.float32])
    torch.testing.assert_close(buf[:, 50:250], expected, **TOL[dtype])
    assert torch.equal(buf[:, :50], before[:, :50]) and torch.equal(buf[:, 250:], before[:, 250:])


def test_target_may_be_strided_and_rows_may_be_empty():
    logits, target = _case(4, 9, torch.float32)
    wide = torch.stack([target, target], 1)[:, 0]
    loss, grad, ref_loss, ref_grad = _both(logits, wide)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    empty = torch.empty(0, 9)
    assert ops.cross_entropy_unit_grad_(empty, torch.empty(0, dtype=torch.int64), IGNORE).shape == (0,)


def test_fallback_path_equals_kernel(monkeypatch):
    logits, target = _case(6, 33, torch.bfloat16, ignored=(0,))
    ours = logits.clone()
    want = ops.cross_entropy_unit_grad_(ours, target, IGNORE)
    monkeypatch.setattr(kernels, "_use_kernel", lambda t: False)
    ref = logits.clone()
    got = ops.cross_entropy_unit_grad_(ref, target, IGNORE)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ref, ours, **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multithreaded_equals_single_threaded(dtype, restore_threads):
    logits, target = _case(64, 1000, dtype, ignored=(5, 6))
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        grad = logits.clone()
        results.append((ops.cross_entropy_unit_grad_(grad, target, IGNORE), grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_bad_target_raises_and_leaves_logits_untouched():
    logits, target = _case(4, 10, torch.float32)
    target[2] = 10
    before = logits.clone()
    with pytest.raises(RuntimeError, match=r"target\[2\] = 10 is outside \[0, 10\)"):
        ops.cross_entropy_unit_grad_(logits, target, IGNORE)
    assert torch.equal(logits, before)
    target[2] = -1
    with pytest.raises(RuntimeError, match=r"target\[2\] = -1 is outside"):
        ops.cross_entropy_unit_grad_(logits, target, IGNORE)


BAD_CALLS = [
    ("logits must be 2-D", lambda: _ops.cross_entropy_unit_grad(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.int64), IGNORE)),
    ("logits must be float32, float64, bfloat16 or float16",
     lambda: _ops.cross_entropy_unit_grad(torch.ones(2, 4, dtype=torch.int32), torch.zeros(2, dtype=torch.int64), IGNORE)),
    ("stride 1", lambda: _ops.cross_entropy_unit_grad(torch.randn(4, 2).t(), torch.zeros(2, dtype=torch.int64), IGNORE)),
    ("no classes", lambda: _ops.cross_entropy_unit_grad(torch.randn(2, 0), torch.zeros(2, dtype=torch.int64), IGNORE)),
    ("target must be int64", lambda: _ops.cross_entropy_unit_grad(torch.randn(2, 4), torch.zeros(2, dtype=torch.int32), IGNORE)),
    ("target must have shape \\[2\\]",
     lambda: _ops.cross_entropy_unit_grad(torch.randn(2, 4), torch.zeros(3, dtype=torch.int64), IGNORE)),
    ("single memory location",
     lambda: _ops.cross_entropy_unit_grad(torch.randn(1, 4).expand(2, 4), torch.zeros(2, dtype=torch.int64), IGNORE)),
]


@pytest.mark.parametrize("message,call", BAD_CALLS, ids=[m for m, _ in BAD_CALLS])
def test_bad_input_raises_clear_error(message, call):
    with pytest.raises(RuntimeError, match=message):
        call()
