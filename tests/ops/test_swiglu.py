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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fwd_bwd(shape, dtype):
    torch.manual_seed(0)
    a = 3 * torch.randn(shape, dtype=dtype)
    b = torch.randn(shape, dtype=dtype)
    g = torch.randn(shape, dtype=dtype)
    ours = _grads(ops.swiglu, [a, b], g)
    theirs = _grads(ops.swiglu_ref, [a, b], g)
    for x, y in zip(ours, theirs):
        assert x.dtype == y.dtype == dtype
        torch.testing.assert_close(x, y, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_matches_reference(dtype):
    torch.manual_seed(0)
    f = 37
    ab = 3 * torch.randn(2, 5, 2 * f, dtype=dtype)
    g = torch.randn(2, 5, f, dtype=dtype)
    out, grad_ab = _grads(ops.swiglu_packed, [ab], g)
    ref_out, ref_a, ref_b = _grads(ops.swiglu_ref, [ab[..., :f], ab[..., f:]], g)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    assert grad_ab.shape == ab.shape and grad_ab.is_contiguous()
    torch.testing.assert_close(grad_ab, torch.cat([ref_a, ref_b], -1), **TOL[dtype])


def test_extreme_inputs():
    """The vectorised exp is clamped: very large |a| must still give silu's limits."""
    a = torch.tensor([-1e4, -200.0, -90.0, -30.0, 0.0, 30.0, 90.0, 200.0, 1e4])
    b = torch.ones_like(a)
    torch.testing.assert_close(ops.swiglu(a, b), ops.swiglu_ref(a, b), rtol=1e-6, atol=1e-30)
    g = torch.ones_like(a)
    for x, y in zip(ops.swiglu_backward(g, a, b), reference.swiglu_bwd_ref(g, a, b)):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-30)


def test_strided_unpacked_views_without_copy():
    """a and b as column slices of one packed matmul output, and a transposed view."""
    torch.manual_seed(0)
    f = 37
    ab = torch.randn(3, 5, 2 * f)
    a, b = ab[..., :f], ab[..., f:]
    g = torch.randn(3, 5, 3 * f)[..., f:2 * f]
    out = ops.swiglu_forward(a, b)
    assert torch.equal(out, ops.swiglu_forward(ab))
    assert torch.equal(out, ops.swiglu_forward(a.contiguous(), b.contiguous()))
    ga, gb = ops.swiglu_backward(g, a, b)
    assert torch.equal(torch.cat([ga, gb], -1), ops.swiglu_backward(g, ab))
    ga2, gb2 = ops.swiglu_backward(g.contiguous(), a.contiguous(), b.contiguous())
    assert torch.equal(ga, ga2) and torch.equal(gb, gb2)
    at = torch.randn(5, 3, f).transpose(0, 1)
    assert torch.equal(ops.swiglu_forward(at, b), ops.swiglu_forward(at.contiguous(), b))


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
    a, b = ab[..., :20], ab[..., 20:]
    want = [ops.swiglu_forward(ab), ops.swiglu_backward(g, ab), ops.swiglu_forward(a, b),
            *ops.swiglu_backward(g, a, b)]
    monkeypatch.setattr(kernels, "_use_kernel", lambda t: False)
    got = [ops.swiglu_forward(ab), ops.swiglu_backward(g, ab), ops.swiglu_forward(a, b),
           *ops.swiglu_backward(g, a, b)]
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


def test_gradcheck_float64():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (a, b))
    ab = torch.randn(2, 3, 14, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu_packed, (ab,))


def test_saves_only_inputs():
    ab = torch.randn(4, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.swiglu(ab[:, :16], ab[:, 16:])
    assert [tuple(t.shape) for t in saved] == [(4, 16), (4, 16)]
    assert all(t.untyped_storage().data_ptr() == ab.untyped_storage().data_ptr() for t in saved)
