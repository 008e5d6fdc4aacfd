import pytest
import torch

from megallama import ops
from megallama.ops import kernels
from megallama.ops._ext import _ops


def _case(tokens, out, inp, dtype, grad_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(tokens, out, generator=g).to(dtype)
    x = torch.randn(tokens, inp, generator=g).to(dtype)
    main_grad = torch.randn(out, inp, generator=g).to(grad_dtype or dtype)
    return main_grad, grad_out, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_dtype_accumulates_twice(dtype):
    main_grad, grad_out, x = _case(33, 17, 12, dtype)
    grad_out2, x2 = torch.randn_like(grad_out), torch.randn_like(x)
    want = main_grad.double() + grad_out.double().t() @ x.double() + grad_out2.double().t() @ x2.double()
    ptr = main_grad.data_ptr()
    ops.wgrad_accumulate_(main_grad, grad_out, x)
    ops.wgrad_accumulate_(main_grad, grad_out2, x2)
    assert main_grad.data_ptr() == ptr and main_grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(main_grad.double(), want, **tol)


def test_bfloat16_inputs_into_float32_main_grad():
    """On CPU the fallback: the bfloat16 product, added to the float32 buffer."""
    main_grad, grad_out, x = _case(64, 24, 40, torch.bfloat16, torch.float32)
    before = main_grad.clone()
    ops.wgrad_accumulate_(main_grad, grad_out, x)
    assert main_grad.dtype == torch.float32
    assert torch.equal(main_grad, before + (grad_out.t() @ x).float())
    torch.testing.assert_close(main_grad, before + grad_out.float().t() @ x.float(), rtol=1.6e-2, atol=5e-2)


def test_strided_rows_and_empty_tokens():
    main_grad, grad_out, x = _case(10, 6, 5, torch.float32)
    wide = torch.randn(10, 9)
    x_view = wide[:, 2:7]
    want = main_grad + grad_out.t() @ x_view
    ops.wgrad_accumulate_(main_grad, grad_out, x_view)
    torch.testing.assert_close(main_grad, want)
    before = main_grad.clone()
    ops.wgrad_accumulate_(main_grad, torch.empty(0, 6), torch.empty(0, 5))
    assert torch.equal(main_grad, before)


def test_fallback_path_equals_extension(monkeypatch):
    for grad_dtype in (torch.float32, torch.bfloat16):
        main_grad, grad_out, x = _case(16, 8, 4, torch.bfloat16, grad_dtype)
        ours, ref = main_grad.clone(), main_grad.clone()
        ops.wgrad_accumulate_(ours, grad_out, x)
        with monkeypatch.context() as m:
            m.setattr(kernels, "_use_kernel", lambda t: False)
            ops.wgrad_accumulate_(ref, grad_out, x)
        torch.testing.assert_close(ours, ref)


@pytest.mark.skipif(not ops.has_fp32_wgrad_gemm(), reason="torch < 2.8 has no fp32-output addmm")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_fp32_output_call_off_the_cpu_on_meta_tensors(dtype):
    """The call a CUDA tensor gets (16-bit inputs, float32 main_grad, the GEMM writing into it), on
    meta tensors: torch takes its dtypes, shapes and in-place output (the values: ops_cuda_check)."""
    main_grad = torch.empty(4, 3, device="meta")
    _ops.wgrad_accumulate(main_grad, torch.empty(5, 4, dtype=dtype, device="meta"),
                          torch.empty(5, 3, dtype=dtype, device="meta"))
    assert main_grad.dtype == torch.float32 and main_grad.shape == (4, 3)


def _f(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


BAD_CALLS = [
    ("grad_out must be 2-D", lambda: _ops.wgrad_accumulate(_f(4, 3), _f(2, 2, 4), _f(2, 3))),
    ("x must be float32, float64, bfloat16 or float16",
     lambda: _ops.wgrad_accumulate(_f(4, 3), _f(2, 4), torch.ones(2, 3, dtype=torch.int64))),
    ("x must be contiguous in its last dimension", lambda: _ops.wgrad_accumulate(_f(4, 3), _f(2, 4), _f(3, 2).t())),
    ("grad_out is BFloat16 but x is Float",
     lambda: _ops.wgrad_accumulate(_f(4, 3), _f(2, 4, dtype=torch.bfloat16), _f(2, 3))),
    ("same number of rows", lambda: _ops.wgrad_accumulate(_f(4, 3), _f(2, 4), _f(5, 3))),
    ("main_grad must have shape \\[out, in\\] = \\[4, 3\\]", lambda: _ops.wgrad_accumulate(_f(3, 4), _f(2, 4), _f(2, 3))),
    ("main_grad must be float32 or the inputs' dtype",
     lambda: _ops.wgrad_accumulate(_f(4, 3, dtype=torch.float64), _f(2, 4), _f(2, 3))),
    ("main_grad must be contiguous", lambda: _ops.wgrad_accumulate(_f(3, 4).t(), _f(2, 4), _f(2, 3))),
]


@pytest.mark.parametrize("message,call", BAD_CALLS, ids=[m for m, _ in BAD_CALLS])
def test_bad_input_raises_clear_error(message, call):
    with pytest.raises(RuntimeError, match=message):
        call()
