import pytest
import torch

from megallama import ops
from megallama.ops import kernels, reference
from tests.ops.conftest import TOL

SHAPES = [(2, 5, 37), (1, 1, 1), (1, 1, 256), (3, 64), (1, 7, 300)]


def _grads(fn, inputs, g):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(g)
    return [out.detach()] + [t.grad for t in inputs]


def _reference(ab):
    f = ab.shape[-1] // 2
    return ops.swiglu_ref(ab[..., :f], ab[..., f:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fwd_bwd(shape, dtype):
    torch.manual_seed(0)
    ab = torch.cat([3 * torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)], -1)
    g = torch.randn(shape, dtype=dtype)
    ours = _grads(ops.swiglu_packed, [ab], g)
    theirs = _grads(_reference, [ab], g)
    assert ours[1].shape == ab.shape and ours[1].is_contiguous()
    for x, y in zip(ours, theirs):
        assert x.dtype == y.dtype == dtype
        torch.testing.assert_close(x, y, **TOL[dtype])


def test_extreme_inputs():
    """The vectorised exp is clamped: very large |a| must still give silu's limits."""
    a = torch.tensor([-1e4, -200.0, -90.0, -30.0, 0.0, 30.0, 90.0, 200.0, 1e4])
    b = torch.ones_like(a)
    ab = torch.cat([a, b])
    torch.testing.assert_close(ops.swiglu_forward(ab), ops.swiglu_ref(a, b), rtol=1e-6, atol=1e-30)
    g = torch.ones_like(a)
    torch.testing.assert_close(ops.swiglu_backward(g, ab), torch.cat(reference.swiglu_bwd_ref(g, a, b)),
                               rtol=1e-6, atol=1e-30)


def test_strided_rows_without_copy():
    """Rows of ab and grad_out as column slices of wider tensors, and a transposed view."""
    torch.manual_seed(0)
    f = 37
    ab = torch.randn(3, 5, 3 * f)[..., f:]
    g = torch.randn(3, 5, 3 * f)[..., f:2 * f]
    assert torch.equal(ops.swiglu_forward(ab), ops.swiglu_forward(ab.contiguous()))
    assert torch.equal(ops.swiglu_backward(g, ab), ops.swiglu_backward(g.contiguous(), ab.contiguous()))
    at = torch.randn(5, 3, 2 * f).transpose(0, 1)
    assert torch.equal(ops.swiglu_forward(at), ops.swiglu_forward(at.contiguous()))


def test_closed_form_reference_matches_autograd():
    torch.manual_seed(0)
    a, b, g = 3 * torch.randn(4, 19), torch.randn(4, 19), torch.randn(4, 19)
    _, ga, gb = _grads(ops.swiglu_ref, [a, b], g)
    ca, cb = reference.swiglu_bwd_ref(g, a, b)
    torch.testing.assert_close(ca, ga)
    torch.testing.assert_close(cb, gb)


def test_fallback_path_equals_kernels(monkeypatch):
    torch.manual_seed(0)
    ab, g = torch.randn(2, 3, 40), torch.randn(2, 3, 20)
    want = [ops.swiglu_forward(ab), ops.swiglu_backward(g, ab)]
    monkeypatch.setattr(kernels, "_use_kernel", lambda t: False)
    got = [ops.swiglu_forward(ab), ops.swiglu_backward(g, ab)]
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


def test_gradcheck_float64():
    torch.manual_seed(0)
    ab = torch.randn(2, 3, 14, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu_packed, (ab,))


def test_saves_only_inputs():
    ab = torch.randn(4, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.swiglu_packed(ab)
    assert [tuple(t.shape) for t in saved] == [(4, 32)]
    assert all(t.untyped_storage().data_ptr() == ab.untyped_storage().data_ptr() for t in saved)
