"""Tensor-parallel shards (fused stacks, split columns, a padded vocabulary) and ZeRO slices are
saved as pieces of the full tensors: loading them into an unsplit model gives the serial weights."""
import types

import torch
from torch import nn

from megallama.parallel import ColumnParallelLinear, RowParallelLinear, TensorSplit, VocabParallelEmbedding, state
from megallama.checkpoint import sharded
from megallama.checkpoint import storage as ckpt
from tests.distributed_utils import run_distributed


def _layers():
    torch.manual_seed(0)  # the same full weights on every rank; each keeps its shard
    return nn.ModuleDict({
        # [wq; wk; wv] of unequal parts (grouped-query attention): 8, 2 and 2 rows
        "qkv": ColumnParallelLinear(8, 12, split=TensorSplit(0, (8, 2, 2))),
        # one key/value head of 2 rows, fewer heads than TP ranks: held by both, saved once
        "gqa": ColumnParallelLinear(8, 12, split=TensorSplit(0, (8, 2, 2), units=(4, 1, 1))),
        "wo": RowParallelLinear(12, 8),                  # split along its input columns
        "emb": VocabParallelEmbedding(7, 8),             # 7 rows padded to 8 for TP=2
        "norm": nn.Module(),
    })


def _zero_optimizer(model, dp_rank, dp):
    """A stand-in for the ZeRO optimizer: DP rank ``d`` owns the d-th half of each flat parameter;
    AdamW's moments are the parameter × 2 and × 3."""
    entries, adam = [], {}
    for name, p in model.named_parameters():
        lo, hi = p.numel() * dp_rank // dp, p.numel() * (dp_rank + 1) // dp
        main = p.detach().reshape(-1)[lo:hi].clone()
        entries.append(types.SimpleNamespace(name=name, param=p, main=main, lo=lo, hi=hi))
        adam[main] = {"step": torch.tensor(3.0), "exp_avg": main * 2, "exp_avg_sq": main * 3}
    return types.SimpleNamespace(entries=entries, sharded=True, optimizer=types.SimpleNamespace(state=adam))


def _save_under_tp2_dp2(root):
    state.initialize_model_parallel(2, 1)
    try:
        model = _layers()
        model["norm"].weight = nn.Parameter(torch.arange(8.0))
        tp_rank, dp_rank = state.get_tensor_model_parallel_rank(), state.get_data_parallel_rank()
        pieces = sharded.model_pieces([model], tp_rank, 2, dp_rank)
        pieces += sharded.optimizer_pieces(_zero_optimizer(model, dp_rank, 2), tp_rank, 2, dp_rank)[0]
        ckpt.save_checkpoint(root, 7, pieces, {}, {})
        return {name: model[name].full_weight() for name in ("qkv", "gqa", "wo", "emb")}
    finally:
        state.destroy_model_parallel()


def test_tp_and_zero_pieces_load_into_the_serial_layout(tmp_path):
    full = run_distributed(_save_under_tp2_dp2, 4, str(tmp_path))[0]
    assert full["emb"].shape == (7, 8) and full["qkv"].shape == (12, 8)
    serial = _layers()  # no process groups: TP size 1, whole tensors
    serial["norm"].weight = nn.Parameter(torch.zeros(8))
    for p in serial.parameters():
        p.data.zero_()
    _, iter_dir, metadata = ckpt.latest_checkpoint(str(tmp_path))
    # q rows from each TP rank; the replicated key and value rows once each
    assert len(metadata["pieces"]["model.gqa.weight"]) == 4
    assert ckpt.load_pieces(iter_dir, metadata, sharded.model_pieces([serial], 0, 1, 0)) == []
    for name in ("qkv", "gqa", "wo", "emb"):
        torch.testing.assert_close(serial[name].weight, full[name], rtol=0, atol=0)
    assert torch.equal(serial["norm"].weight, torch.arange(8.0))
    optimizer = _zero_optimizer(serial, 0, 1)
    pieces, buffers = sharded.optimizer_pieces(optimizer, 0, 1, 0, destination=True)
    assert ckpt.load_pieces(iter_dir, metadata, pieces) == []
    for index, e in enumerate(optimizer.entries):
        torch.testing.assert_close(buffers[(index, "exp_avg")], e.param.detach().reshape(-1) * 2, rtol=0, atol=0)
        torch.testing.assert_close(buffers[(index, "exp_avg_sq")], e.param.detach().reshape(-1) * 3, rtol=0, atol=0)
