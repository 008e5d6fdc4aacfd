import importlib
import sys

import pytest
import torch

import megallama
from megallama import ops
from megallama.ops._ext import _ops


def _cos_sin(s=4, d=8):
    return ops.rope_cos_sin(s, d)


BAD_CALLS = [
    ("weight must have shape", lambda: _ops.rms_norm_fwd(torch.randn(2, 8), torch.randn(7), 1e-6)),
    ("must be float32, float64 or bfloat16",
     lambda: _ops.rms_norm_fwd(torch.ones(2, 8, dtype=torch.int64), torch.randn(8), 1e-6)),
    ("stride 1", lambda: _ops.rms_norm_fwd(torch.randn(8, 4).t(), torch.randn(8), 1e-6)),
    ("does not go with", lambda: _ops.rms_norm_fwd(torch.randn(2, 8, dtype=torch.float64), torch.randn(8), 1e-6)),
    ("eps must be finite", lambda: _ops.rms_norm_fwd(torch.randn(2, 8), torch.randn(8), -1.0)),
    ("rstd must have shape", lambda: _ops.rms_norm_bwd(torch.randn(2, 8), torch.randn(2, 8), torch.randn(8), torch.ones(3))),
    ("rstd must be Float",
     lambda: _ops.rms_norm_bwd(torch.randn(2, 8), torch.randn(2, 8), torch.randn(8), torch.ones(2, dtype=torch.float64))),
    ("grad_y has shape", lambda: _ops.rms_norm_bwd(torch.randn(2, 9), torch.randn(2, 8), torch.randn(8), torch.ones(2))),
    ("must be even", lambda: _ops.swiglu_fwd(torch.randn(2, 7))),
    ("grad_out must have shape", lambda: _ops.swiglu_bwd(torch.randn(2, 4), torch.randn(2, 6))),
    ("same dtype", lambda: _ops.swiglu_bwd(torch.randn(2, 2, dtype=torch.float64), torch.randn(2, 4))),
    ("must be 4-D", lambda: _ops.rope_apply(torch.randn(4, 2, 8), *_cos_sin(), torch.empty(4, 2, 8), False)),
    ("head_dim must be even", lambda: _ops.rope_apply(torch.randn(1, 4, 2, 7), torch.ones(4, 3), torch.ones(4, 3), torch.empty(1, 4, 2, 7), False)),
    ("cos must have shape", lambda: _ops.rope_apply(torch.randn(1, 5, 2, 8), *_cos_sin(), torch.empty(1, 5, 2, 8), False)),
    ("cos must be float32",
     lambda: _ops.rope_apply(torch.randn(1, 4, 2, 8), _cos_sin()[0].double(), _cos_sin()[1], torch.empty(1, 4, 2, 8), False)),
    ("out has shape", lambda: _ops.rope_apply(torch.randn(1, 4, 2, 8), *_cos_sin(), torch.empty(1, 4, 3, 8), False)),
    ("refer to a single memory location", lambda: (lambda x: _ops.rope_apply(x, *_cos_sin(), x, False))(torch.randn(1, 4, 2, 8))),
]


@pytest.mark.parametrize("message,call", BAD_CALLS, ids=[m for m, _ in BAD_CALLS])
def test_bad_input_raises_clear_error(message, call):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_python_layer_errors():
    with pytest.raises(ValueError, match="head_dim must be even"):
        ops.rope_cos_sin(4, 7)


def test_missing_extension_fails_loudly(monkeypatch):
    monkeypatch.delattr(megallama, "_ops")
    monkeypatch.setitem(sys.modules, "megallama._ops", None)
    monkeypatch.delitem(sys.modules, "megallama.ops._ext")
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        importlib.import_module("megallama.ops._ext")


def _all_ops(inputs):
    x, w, ab, g, gf, q, cos, sin = inputs
    y, rstd = ops.rms_norm_forward(x, w, 1e-6)
    return [y, rstd, *ops.rms_norm_backward(g, x, w, rstd), ops.swiglu_forward(ab), ops.swiglu_backward(gf, ab),
            ops.rope_forward(q, cos, sin), ops.rope_backward(q, cos, sin)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multithreaded_equals_single_threaded(dtype, restore_threads):
    torch.manual_seed(0)
    rows, h, f = 1000, 96, 136
    cos, sin = ops.rope_cos_sin(250, 64)
    inputs = [torch.randn(rows, h, dtype=dtype), torch.randn(h, dtype=dtype),
              torch.randn(rows, 2 * f, dtype=dtype), torch.randn(rows, h, dtype=dtype),
              torch.randn(rows, f, dtype=dtype), torch.randn(4, 250, 4, 64, dtype=dtype), cos, sin]
    torch.set_num_threads(1)
    single = _all_ops(inputs)
    torch.set_num_threads(2)
    multi = _all_ops(inputs)
    for a, b in zip(single, multi):
        assert torch.equal(a, b)


def test_empty_inputs():
    """Zero rows (e.g. an empty micro-batch) give empty results, not an error or a crash."""
    x, w = torch.randn(0, 8), torch.randn(8)
    y, rstd = ops.rms_norm_forward(x, w, 1e-6)
    assert y.shape == (0, 8) and rstd.shape == (0,)
    gx, gw = ops.rms_norm_backward(x, x, w, rstd)
    assert gx.shape == (0, 8) and torch.equal(gw, torch.zeros(8))
    ab = torch.randn(0, 3, 10)
    assert ops.swiglu_forward(ab).shape == (0, 3, 5)
    assert ops.swiglu_backward(torch.randn(0, 3, 5), ab).shape == (0, 3, 10)
    q = torch.randn(2, 0, 3, 8)
    cos, sin = ops.rope_cos_sin(0, 8)
    assert ops.rope_forward(q, cos, sin).shape == (2, 0, 3, 8)
