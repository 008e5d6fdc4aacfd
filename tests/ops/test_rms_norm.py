import pytest
import torch

from megallama import ops
from megallama.ops import kernels, reference
from tests.ops.conftest import TOL

SHAPES = [(2, 5, 37), (1, 1, 1), (1, 1, 256), (3, 64), (1, 7, 300)]


def _grads(fn, x, w, g):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w)
    y.backward(g)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fwd_bwd(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    g = torch.randn(shape, dtype=dtype)
    ours = _grads(lambda x, w: ops.rms_norm(x, w, 1e-6), x, w, g)
    theirs = _grads(lambda x, w: ops.rms_norm_ref(x, w, 1e-6), x, w, g)
    # grad_weight sums over rows: allow for the summation order
    tol_w = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else TOL[dtype]
    for a, b, tol in zip(ours, theirs, [TOL[dtype], TOL[dtype], tol_w]):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, **tol)


def test_reference_matches_huggingface():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 4, 48)
    torch.testing.assert_close(ops.rms_norm(x, norm.weight, 1e-6), norm(x), rtol=1e-6, atol=1e-6)


def test_bf16_input_with_fp32_weight():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 40, dtype=torch.bfloat16)
    w = torch.randn(40)
    g = torch.randn(4, 6, 40, dtype=torch.bfloat16)
    ours = _grads(lambda x, w: ops.rms_norm(x, w, 1e-5), x, w, g)
    theirs = _grads(lambda x, w: ops.rms_norm_ref(x, w, 1e-5), x, w, g)
    assert ours[0].dtype == torch.bfloat16 and ours[2].dtype == torch.float32
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL[torch.bfloat16])


def test_strided_rows_fwd_bwd_without_copy():
    """x and grad_y are views into packed tensors (rows strided, also non-collapsible leading
    dims); results equal those of the contiguous copies."""
    torch.manual_seed(0)
    h = 37
    packed = torch.randn(3, 5, 3 * h)
    x = packed[..., h:2 * h]
    xt = torch.randn(5, 3, h).transpose(0, 1)   # leading dims not collapsible
    w = torch.randn(h)
    for xs in (x, xt):
        g = torch.randn(3, 5, 2 * h)[..., :h]
        y, rstd = ops.rms_norm_forward(xs, w, 1e-6)
        y_ref, rstd_ref = ops.rms_norm_forward(xs.contiguous(), w, 1e-6)
        assert torch.equal(y, y_ref) and torch.equal(rstd, rstd_ref)
        gx, gw = ops.rms_norm_backward(g, xs, w, rstd)
        gx_ref, gw_ref = ops.rms_norm_backward(g.contiguous(), xs.contiguous(), w, rstd)
        assert torch.equal(gx, gx_ref) and torch.equal(gw, gw_ref)


def test_raw_callers_match_closed_form_reference():
    """The raw kernels and the closed-form reference backward (the fallback on devices without
    kernels) agree, and the closed form agrees with autograd."""
    torch.manual_seed(0)
    x, w, g = torch.randn(6, 33), torch.randn(33), torch.randn(6, 33)
    y, rstd = ops.rms_norm_forward(x, w, 1e-6)
    y_ref, rstd_ref = reference.rms_norm_fwd_ref(x, w, 1e-6)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(rstd, rstd_ref)
    got = ops.rms_norm_backward(g, x, w, rstd)
    closed = reference.rms_norm_bwd_ref(g, x, w, rstd)
    autograd = _grads(lambda x, w: ops.rms_norm_ref(x, w, 1e-6), x, w, g)[1:]
    for a, b, c in zip(got, closed, autograd):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-5)


def test_fallback_path_equals_kernels(monkeypatch):
    torch.manual_seed(0)
    x, w, g = torch.randn(2, 3, 20), torch.randn(20), torch.randn(2, 3, 20)
    y, rstd = ops.rms_norm_forward(x, w, 1e-6)
    grads = ops.rms_norm_backward(g, x, w, rstd)
    monkeypatch.setattr(kernels, "_use_kernel", lambda t: False)
    y2, rstd2 = ops.rms_norm_forward(x, w, 1e-6)
    grads2 = ops.rms_norm_backward(g, x, w, rstd2)
    for a, b in zip((y, rstd, *grads), (y2, rstd2, *grads2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: ops.rms_norm(x, w, 1e-6), (x, w))


def test_saves_only_x_and_rstd():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.rms_norm(x, w, 1e-6)
    assert [tuple(t.shape) for t in saved] == [(4, 16), (4,)]
