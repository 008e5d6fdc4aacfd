"""Mappings, split layers, vocab-parallel cross-entropy and the RNG tracker against their serial
references, on 4 gloo ranks: TP=4, then TP=2 (two groups side by side) in the same processes."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megallama import parallel as mp
from tests.distributed_utils import run_distributed

RTOL, ATOL = 1e-5, 1e-6


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def per_rank(shape, tp, seed):
    """One tensor per TP rank, the same on every process (each rank can build its peers' data)."""
    return [torch.randn(shape, generator=torch.Generator().manual_seed(seed + r)) for r in range(tp)]


def run_with_grad(fn, x, grad):
    x = x.clone().requires_grad_()
    y = fn(x)
    y.backward(grad)
    return y.detach(), x.grad


def _check_mappings(tp, r):
    b, s, h = 4, 8, 12  # every dimension divisible by TP=4
    xs, gs = per_rank((b, s, h), tp, 10), per_rank((b, s, h), tp, 20)
    x, g = xs[r], gs[r]
    chunk = lambda t, dim: t.chunk(tp, dim)[r]  # noqa: E731

    y, gx = run_with_grad(mp.copy_to_tensor_model_parallel_region, x, g)
    close(y, x, "copy fwd"), close(gx, sum(gs), "copy bwd")
    y, gx = run_with_grad(mp.reduce_from_tensor_model_parallel_region, x, g)
    close(y, sum(xs), "reduce fwd"), close(gx, g, "reduce bwd")
    y, gx = run_with_grad(mp.scatter_to_tensor_model_parallel_region, xs[0], chunk(g, -1))
    close(y, chunk(xs[0], -1), "scatter fwd")
    close(gx, torch.cat([gq.chunk(tp, -1)[q] for q, gq in enumerate(gs)], -1), "scatter bwd")
    y, gx = run_with_grad(mp.gather_from_tensor_model_parallel_region, chunk(x, -1), gs[0])
    close(y, torch.cat([xq.chunk(tp, -1)[q] for q, xq in enumerate(xs)], -1), "gather fwd")
    close(gx, chunk(gs[0], -1), "gather bwd")
    for dim in (1, 0):
        y, gx = run_with_grad(lambda t: mp.scatter_to_sequence_parallel_region(t, dim), xs[0], chunk(g, dim))
        close(y, chunk(xs[0], dim), f"seq scatter fwd dim {dim}")
        close(gx, torch.cat([gq.chunk(tp, dim)[q] for q, gq in enumerate(gs)], dim), f"seq scatter bwd dim {dim}")
        y, gx = run_with_grad(lambda t: mp.gather_from_sequence_parallel_region(t, dim), chunk(x, dim), g)
        close(y, torch.cat([xq.chunk(tp, dim)[q] for q, xq in enumerate(xs)], dim), f"seq gather fwd dim {dim}")
        close(gx, chunk(sum(gs), dim), f"seq gather bwd (reduce-scatter) dim {dim}")
        y, gx = run_with_grad(lambda t: mp.gather_from_sequence_parallel_region(t, dim, False), chunk(x, dim), g)
        close(gx, chunk(g, dim), f"seq gather bwd (split) dim {dim}")
        y, gx = run_with_grad(lambda t: mp.reduce_scatter_to_sequence_parallel_region(t, dim), x, chunk(g, dim))
        close(y, chunk(sum(xs), dim), f"seq reduce-scatter fwd dim {dim}")
        close(gx, torch.cat([gq.chunk(tp, dim)[q] for q, gq in enumerate(gs)], dim), f"seq reduce-scatter bwd dim {dim}")
    with pytest.raises(ValueError, match="dimension 1 of size 7"):
        mp.scatter_to_sequence_parallel_region(torch.zeros(2, 7, 4))


def _serial_linear(x, w, g):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = F.linear(x, w)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def _check_linear_layers(tp, r):
    b, s, h, out = 2, 8, 12, 24
    gen = torch.Generator().manual_seed(1)
    x, w_col, w_row = torch.randn(b, s, h, generator=gen), torch.randn(out, h, generator=gen), torch.randn(h, out, generator=gen)
    g_col, g_row = torch.randn(b, s, out, generator=gen), torch.randn(b, s, h, generator=gen)
    ref_y, ref_gx, ref_gw = _serial_linear(x, w_col, g_col)
    # one part; three equal fused parts (q/k/v); unequal parts (grouped-query q, k, v)
    for parts in ((out,), (8, 8, 8), (16, 4, 4)):
        for gather_output in (True, False):
            for sp in (False, True):
                what = f"column parts={parts} gather={gather_output} sp={sp}"
                layer = mp.ColumnParallelLinear(h, out, gather_output=gather_output, sequence_parallel=sp,
                                                split=mp.TensorSplit(0, parts))
                layer.load_full_weight(w_col)
                close(layer.full_weight(), w_col, what + " weight round trip")
                xin = (x.chunk(tp, 1)[r] if sp else x).clone().requires_grad_()
                y = layer(xin)
                # This rank's output columns: its slice of each of the fused parts.
                cols = torch.cat([part.chunk(tp)[r] for part in torch.arange(out).split(parts)])
                close(y, ref_y if gather_output else ref_y[..., cols], what + " output")
                y.backward(g_col if gather_output else g_col[..., cols])
                close(xin.grad, ref_gx.chunk(tp, 1)[r] if sp else ref_gx, what + " input grad")
                close(mp.gather_like(layer.weight, layer.weight.grad), ref_gw, what + " weight grad")
    ref_y, ref_gx, ref_gw = _serial_linear(x.repeat(1, 1, 2), w_row, g_row)
    x2 = x.repeat(1, 1, 2)
    for input_is_parallel, sp in ((True, False), (False, False), (True, True)):
        what = f"row input_is_parallel={input_is_parallel} sp={sp}"
        layer = mp.RowParallelLinear(out, h, input_is_parallel=input_is_parallel, sequence_parallel=sp)
        layer.load_full_weight(w_row)
        close(layer.full_weight(), w_row, what + " weight round trip")
        xin = (x2.chunk(tp, -1)[r] if input_is_parallel else x2).clone().requires_grad_()
        y = layer(xin)
        close(y, ref_y.chunk(tp, 1)[r] if sp else ref_y, what + " output")
        y.backward(g_row.chunk(tp, 1)[r] if sp else g_row)
        close(xin.grad, ref_gx.chunk(tp, -1)[r] if input_is_parallel else ref_gx, what + " input grad")
        close(mp.gather_like(layer.weight, layer.weight.grad), ref_gw, what + " weight grad")
    bad = 10 if tp == 4 else 9
    with pytest.raises(ValueError, match=rf"a part of {bad} along dim 0 .* is not divisible by the tensor-parallel size \({tp}\)"):
        mp.ColumnParallelLinear(h, bad)
    with pytest.raises(ValueError, match=rf"a part of {bad} along dim 1 .* is not divisible"):
        mp.RowParallelLinear(bad, h)


def _check_embedding(tp, r):
    vocab, dim, b, s = 11, 6, 2, 8  # 11 rows: padded to 12 on every TP size here
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(vocab, dim, generator=gen)
    ids = torch.randint(0, vocab, (b, s), generator=gen)
    ids[0, :3] = torch.tensor([0, vocab - 1, vocab - 1])
    g = torch.randn(b, s, dim, generator=gen)
    wref = w.clone().requires_grad_()
    ref = F.embedding(ids, wref)
    ref.backward(g)
    for sp in (False, True):
        layer = mp.VocabParallelEmbedding(vocab, dim, sequence_parallel=sp)
        assert layer.weight.shape == (12 // tp, dim)
        layer.load_full_weight(w)
        close(layer.full_weight(), w, f"embedding sp={sp} round trip")
        y = layer(ids)
        close(y, ref.detach().chunk(tp, 1)[r] if sp else ref.detach(), f"embedding sp={sp} output")
        y.backward(g.chunk(tp, 1)[r] if sp else g)
        full_grad = mp.gather_like(layer.weight, layer.weight.grad)
        close(full_grad, wref.grad, f"embedding sp={sp} weight grad")
    with pytest.raises(IndexError, match=r"\[0, 11\)"):
        layer(torch.tensor([[vocab]]))


def _check_cross_entropy(tp, r):
    b, s = 2, 5
    gen = torch.Generator().manual_seed(3)
    for vocab in (13, 16):  # 13: padded to a multiple of TP; 16: divisible
        padded = mp.TensorSplit(0, (vocab,), pad_to_tp=True).padded_parts(tp)[0]
        logits = torch.randn(b, s, vocab, generator=gen) * 3
        target = torch.randint(0, vocab, (b, s), generator=gen)
        target[0, 0], target[0, 1], target[1, 4] = vocab - 1, 0, -100
        g = torch.rand(b, s, generator=gen)
        ref_logits = logits.clone().requires_grad_()
        ref = F.cross_entropy(ref_logits.view(-1, vocab), target.view(-1), reduction="none").view(b, s)
        ref.backward(g)
        # Garbage in the padding columns: it must get no probability mass.
        full = torch.cat([logits, torch.full((b, s, padded - vocab), 50.0)], -1)
        local = full.chunk(tp, -1)[r].clone().requires_grad_()
        loss = mp.vocab_parallel_cross_entropy(local, target, vocab_size=vocab)
        close(loss, ref.detach(), f"cross-entropy vocab {vocab} loss")
        loss.backward(g)
        grad_full = torch.cat([ref_logits.grad, torch.zeros(b, s, padded - vocab)], -1)
        close(local.grad, grad_full.chunk(tp, -1)[r], f"cross-entropy vocab {vocab} grad")
        # bf16 logits: the loss still in fp32, the gradient in bf16
        local16 = full.chunk(tp, -1)[r].to(torch.bfloat16).requires_grad_()
        loss16 = mp.vocab_parallel_cross_entropy(local16, target, vocab_size=vocab)
        loss16.backward(g)
        assert loss16.dtype == torch.float32 and local16.grad.dtype == torch.bfloat16
        ref16 = F.cross_entropy(logits.to(torch.bfloat16).float().view(-1, vocab), target.view(-1), reduction="none")
        torch.testing.assert_close(loss16, ref16.view(b, s), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(local16.grad.float(), grad_full.chunk(tp, -1)[r], rtol=2e-2, atol=1e-2)
    with pytest.raises(IndexError, match=r"targets must lie in \[0, 13\)"):
        mp.vocab_parallel_cross_entropy(local.detach(), torch.full((b, s), 13), vocab_size=13)


def _gather_all(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


def _check_init_and_rng(tp, r):
    h, out = 12, 24
    init = mp.init_method_normal(0.5)
    torch.manual_seed(7)
    column = mp.ColumnParallelLinear(h, out, split=mp.TensorSplit(0, (8, 8, 8)), init_method=init)
    row = mp.RowParallelLinear(out, h, init_method=init)
    embedding = mp.VocabParallelEmbedding(11, h)
    torch.manual_seed(7)
    serial = [init(torch.empty(out, h)), init(torch.empty(h, out)), torch.nn.init.normal_(torch.empty(11, h))]
    for name, layer, ref in zip(("column", "row", "embedding"), (column, row, embedding), serial):
        close(layer.full_weight(), ref, f"init {name}")

    mp.model_parallel_manual_seed(1234, device_type="cpu")  # the CPU generator even where a GPU is present
    default = torch.rand(4)
    with mp.get_rng_tracker().fork():
        forked = torch.rand(4)
    after = torch.rand(4)
    torch.manual_seed(1234)
    plain = torch.rand(8)
    close(torch.cat([default, after]), plain, "the fork leaves the default stream untouched")
    defaults, forks = _gather_all(default), _gather_all(forked)
    tp_rank_of = [q % tp for q in range(dist.get_world_size())]
    for q in range(dist.get_world_size()):
        assert torch.equal(defaults[q], default), "default stream differs across ranks"
        same_tp_rank = tp_rank_of[q] == r
        assert torch.equal(forks[q], forked) == same_tp_rank, "TP ranks must differ, DP replicas agree"
    with pytest.raises(ValueError, match="already exists"):
        mp.get_rng_tracker().add(mp.MODEL_PARALLEL_RNG, 1)


def _all_checks():
    for tp in (4, 2):
        mp.initialize_model_parallel(tp)
        r = mp.get_tensor_model_parallel_rank()
        _check_mappings(tp, r)
        _check_linear_layers(tp, r)
        _check_embedding(tp, r)
        _check_cross_entropy(tp, r)
        _check_init_and_rng(tp, r)
        mp.destroy_model_parallel()
    return True


def test_mappings_layers_loss_and_init_equal_serial_at_tp2_and_tp4():
    assert run_distributed(_all_checks, 4, timeout=180) == [True] * 4


def test_serial_process_layers_are_plain_linear_and_embedding():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8)
    column, row = mp.ColumnParallelLinear(8, 6, sequence_parallel=True), mp.RowParallelLinear(6, 8)
    close(row(column(x)), x @ column.weight.t() @ row.weight.t(), "column then row")
    emb = mp.VocabParallelEmbedding(5, 8)
    ids = torch.tensor([[0, 4, 2]])
    close(emb(ids), F.embedding(ids, emb.weight), "embedding")
    logits, target = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, -100])
    close(mp.vocab_parallel_cross_entropy(logits, target), F.cross_entropy(logits, target, reduction="none"), "loss")
    assert mp.TensorSplit(0, (2, 2, 2)).shard(torch.arange(12).view(6, 2), rank=1, tp=2).flatten().tolist() == [
        2, 3, 6, 7, 10, 11]
    assert mp.TensorSplit(0, (4, 2)).shard(torch.arange(6).view(6, 1), rank=1, tp=2).flatten().tolist() == [2, 3, 5]
    with pytest.raises(ValueError, match=r"a part of 3 along dim 0 .* is not divisible by the tensor-parallel size \(2\)"):
        mp.TensorSplit(0, (3, 3)).shard(torch.zeros(6, 2), rank=0, tp=2)
