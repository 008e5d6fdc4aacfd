import pytest
import torch

from megallama import ops
from megallama.ops import kernels
from tests.ops.conftest import TOL

SHAPES = [(2, 5, 3, 8), (1, 1, 1, 2), (1, 7, 2, 64), (2, 3, 4, 38)]


def _grads(fn, q, k, gq, gk):
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    qo, ko = fn(q, k)
    torch.autograd.backward([qo, ko], [gq, gk])
    return qo.detach(), ko.detach(), q.grad, k.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_fwd_bwd(shape, dtype):
    torch.manual_seed(0)
    b, s, h, d = shape
    cos, sin = ops.rope_cos_sin(s, d, offset=3)
    q, k = torch.randn(shape, dtype=dtype), torch.randn(b, s, 1, d, dtype=dtype)
    gq, gk = torch.randn(shape, dtype=dtype), torch.randn(b, s, 1, d, dtype=dtype)
    ours = _grads(lambda q, k: ops.apply_rotary(q, k, cos, sin), q, k, gq, gk)
    theirs = _grads(lambda q, k: (ops.rope_ref(q, cos, sin), ops.rope_ref(k, cos, sin)), q, k, gq, gk)
    for x, y in zip(ours, theirs):
        assert x.dtype == y.dtype == dtype
        torch.testing.assert_close(x, y, **TOL[dtype])


def test_output_layout_is_attention_ready():
    q = torch.randn(2, 5, 3, 8)
    qo, ko = ops.apply_rotary(q, q.clone(), *ops.rope_cos_sin(5, 8))
    assert qo.shape == (2, 5, 3, 8) and qo.transpose(1, 2).is_contiguous()
    assert ko.transpose(1, 2).is_contiguous()


def test_matches_huggingface():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    torch.manual_seed(0)
    b, s, h, d = 2, 9, 3, 16
    config = LlamaConfig(hidden_size=h * d, num_attention_heads=h, rope_theta=500.0,
                         max_position_embeddings=64)
    positions = torch.arange(4, 4 + s).expand(b, s)
    q, k = torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(q, positions)
    cos, sin = ops.rope_cos_sin(s, d, theta=500.0, offset=4)
    assert torch.equal(cos, hf_cos[0, :, : d // 2]) and torch.equal(sin, hf_sin[0, :, : d // 2])
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin)
    qo, ko = ops.apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(qo.transpose(1, 2), hq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ko.transpose(1, 2), hk, rtol=1e-6, atol=1e-6)


def test_strided_inputs_and_outputs():
    """q/k as views of a packed qkv projection, written into a strided buffer; any-strided grads."""
    torch.manual_seed(0)
    b, s, h, d = 2, 5, 3, 8
    qkv = torch.randn(b, s, 3 * h * d)
    q = qkv[..., : h * d].view(b, s, h, d)
    cos, sin = ops.rope_cos_sin(s, d)
    want = ops.rope_ref(q, cos, sin)
    out = torch.empty(b, s, 2 * h, d)[:, :, ::2]
    assert ops.rope_forward(q, cos, sin, out=out) is out
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(ops.rope_forward(q, cos, sin), want)
    grad = torch.randn(b, h, s, d).transpose(1, 2)
    back = ops.rope_backward(grad, cos, sin)
    assert back.is_contiguous()
    torch.testing.assert_close(back, ops.rope_ref(grad, cos, sin, inverse=True))
    # autograd hands an expanded (stride 0) gradient for a sum()
    qr = q.detach().requires_grad_()
    qo, _ = ops.apply_rotary(qr, qr.detach(), cos, sin)
    qo.sum().backward()
    torch.testing.assert_close(qr.grad, ops.rope_ref(torch.ones_like(q), cos, sin, inverse=True))


def test_inverse_undoes_forward():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 2, 32)
    cos, sin = ops.rope_cos_sin(6, 32, offset=100)
    torch.testing.assert_close(ops.rope_backward(ops.rope_forward(x, cos, sin), cos, sin), x,
                               rtol=1e-5, atol=1e-5)


def test_fallback_path_equals_kernels(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 10)
    cos, sin = ops.rope_cos_sin(4, 10)
    want = (ops.rope_forward(x, cos, sin), ops.rope_backward(x, cos, sin))
    monkeypatch.setattr(kernels, "_use_kernel", lambda t: False)
    got = (ops.rope_forward(x, cos, sin), ops.rope_backward(x, cos, sin))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert got[0].transpose(1, 2).is_contiguous()


def test_gradcheck_float64():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 2, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 1, 6, dtype=torch.float64, requires_grad=True)
    cos, sin = ops.rope_cos_sin(3, 6)
    assert torch.autograd.gradcheck(lambda q, k: ops.apply_rotary(q, k, cos, sin), (q, k))
