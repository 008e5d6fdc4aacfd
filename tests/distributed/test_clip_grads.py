"""Global-norm clipping equals torch's on one rank; which copies count; NaN/inf detection."""
import pytest
import torch

from megallama.distributed import clip_grads_, counts_for_norm, global_grad_norm
from megallama.distributed.clip_grads import is_finite
from megallama.parallel import TensorSplit


def _grads():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(7, 5, generator=g), torch.randn(11, generator=g), torch.randn(3, 3, 2, generator=g)]


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_single_rank_norm_and_clipping_equal_torch(max_norm):
    ours, theirs = _grads(), [torch.nn.Parameter(torch.zeros_like(g)) for g in _grads()]
    for p, g in zip(theirs, _grads()):
        p.grad = g
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    norm = global_grad_norm(ours)  # no process groups: the norm of this rank's gradients
    torch.testing.assert_close(norm, expected)
    clip_grads_(ours, max_norm, norm)
    for g, p in zip(ours, theirs):
        torch.testing.assert_close(g, p.grad)


def test_which_copy_counts():
    split, replicated, shared = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    split.tp_split = TensorSplit(0, (2,))
    shared.shared = True
    assert counts_for_norm(split, tp_rank=1, pp_rank=0)           # shards are disjoint
    assert counts_for_norm(replicated, tp_rank=0, pp_rank=3)      # TP rank 0 owns replicas
    assert not counts_for_norm(replicated, tp_rank=1, pp_rank=0)
    assert counts_for_norm(shared, tp_rank=0, pp_rank=0)          # the first stage owns shared
    assert not counts_for_norm(shared, tp_rank=0, pp_rank=1)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_norm_is_detected(bad):
    grads = _grads()
    grads[1][3] = bad
    assert not is_finite(global_grad_norm(grads))
    assert is_finite(global_grad_norm(_grads()))
