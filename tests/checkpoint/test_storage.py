"""Checkpoint pieces saved by one layout load into another; crashes leave the previous one loadable."""
import os
import random

import numpy as np
import pytest
import torch

from megallama.fileio import atomic_open
from megallama.checkpoint import storage as ck


def _pieces(full: dict, tp: int, tp_rank: int, dp: int, dp_rank: int, shard_dims: dict, zero: bool):
    """This rank's pieces of ``full`` under TP (split on ``shard_dims[key]``; None = replicated) and,
    with ``zero``, DP ranks each holding an uneven flat range of their TP shard."""
    pieces = []
    for key, tensor in full.items():
        dim = shard_dims[key]
        offsets = [0] * tensor.dim()
        local = tensor
        if dim is not None:
            size = tensor.shape[dim] // tp
            offsets[dim] = tp_rank * size
            local = tensor.narrow(dim, tp_rank * size, size)
        if zero:
            numel = local.numel()
            cuts = [0] + [min(numel, (numel * (i + 1)) // dp + i % 2) for i in range(dp - 1)] + [numel]
            a, b = cuts[dp_rank], cuts[dp_rank + 1]
            pieces.append(ck.ShardedTensor(key, local.reshape(-1)[a:b].clone(), tensor.shape, offsets,
                                           shape=local.shape, flat_range=(a, b)))
        else:
            writes = dp_rank == 0 and (dim is not None or tp_rank == 0)
            pieces.append(ck.ShardedTensor(key, local.clone(), tensor.shape, offsets, write=writes))
    return pieces


def _save_layout(root, iteration, full, tp, dp, shard_dims, zero, write_tracker=True):
    iter_dir = ck.checkpoint_dir(root, iteration)
    metadata = []
    for rank in range(tp * dp):
        tp_rank, dp_rank = rank % tp, rank // tp
        pieces = _pieces(full, tp, tp_rank, dp, dp_rank, shard_dims, zero)
        metadata.append(ck.write_rank_file(iter_dir, rank, pieces, {"rank": rank}))
    ck.write_metadata(iter_dir, iteration, tp * dp, metadata, {"consumed_samples": 7 * iteration})
    if write_tracker:
        ck.write_tracker(root, iteration)


FULL = {
    "wq": torch.arange(8 * 12, dtype=torch.float32).reshape(8, 12),
    "wo": torch.randn(12, 8, generator=torch.Generator().manual_seed(0)),
    "norm": torch.randn(12, generator=torch.Generator().manual_seed(1)),
    "step": torch.tensor(5.0),
}
DIMS = {"wq": 0, "wo": 1, "norm": None, "step": None}


@pytest.mark.parametrize("source, target", [
    ((2, 2, False), (4, 1, True)),
    ((2, 2, True), (1, 3, True)),
    ((4, 1, True), (2, 2, False)),
    ((1, 1, False), (4, 3, True)),
])
def test_load_into_another_layout_gives_the_same_full_tensors(tmp_path, source, target):
    tp, dp, zero = source
    _save_layout(str(tmp_path), 100, FULL, tp, dp, DIMS, zero)
    iteration, iter_dir, metadata = ck.latest_checkpoint(str(tmp_path))
    assert iteration == 100 and metadata["common"] == {"consumed_samples": 700}
    tp2, dp2, zero2 = target
    for rank in range(tp2 * dp2):
        expected = _pieces(FULL, tp2, rank % tp2, dp2, rank // tp2, DIMS, zero2)
        targets = [ck.ShardedTensor(p.key, torch.full_like(p.data, float("nan")), p.global_shape, p.offsets,
                                    shape=p.shape, flat_range=p.flat_range) for p in expected]
        assert ck.load_pieces(iter_dir, metadata, targets) == []
        for got, want in zip(targets, expected):
            torch.testing.assert_close(got.data, want.data, rtol=0, atol=0)


def test_load_casts_to_the_target_dtype(tmp_path):
    _save_layout(str(tmp_path), 1, FULL, 2, 1, DIMS, False)
    _, iter_dir, metadata = ck.latest_checkpoint(str(tmp_path))
    target = ck.replicated("wo", torch.empty(12, 8, dtype=torch.bfloat16))
    ck.load_pieces(iter_dir, metadata, [target])
    assert torch.equal(target.data, FULL["wo"].to(torch.bfloat16))


def test_crash_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    root = str(tmp_path)
    _save_layout(root, 100, FULL, 2, 1, DIMS, False)
    # Crash after the rank files, before the index: iteration 200 has no metadata, no tracker.
    iter_dir = ck.checkpoint_dir(root, 200)
    ck.write_rank_file(iter_dir, 0, _pieces(FULL, 2, 0, 1, 0, DIMS, False), {})
    # Crash while writing a file: nothing appears under the final name, no temporary is left.
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_open(os.path.join(iter_dir, "metadata.json"), "w", fsync=True) as f:
            f.write("{")
            _fail()
    assert sorted(os.listdir(iter_dir)) == ["rank_00000.pt"]
    iteration, loaded_dir, metadata = ck.latest_checkpoint(root)
    assert iteration == 100
    target = ck.replicated("wq", torch.empty(8, 12))
    ck.load_pieces(loaded_dir, metadata, [target])
    assert torch.equal(target.data, FULL["wq"])
    # A tracker naming an incomplete folder is reported, not half-loaded.
    ck.write_tracker(root, 200)
    with pytest.raises(ck.CheckpointError, match="metadata.json is missing"):
        ck.latest_checkpoint(root)


def _fail():
    raise RuntimeError("disk gone")


def test_missing_wrong_shaped_and_incomplete_tensors_are_errors(tmp_path):
    root = str(tmp_path)
    _save_layout(root, 3, FULL, 2, 2, DIMS, True)
    _, iter_dir, metadata = ck.latest_checkpoint(root)
    with pytest.raises(ck.CheckpointError, match="no tensor named 'wk'"):
        ck.load_pieces(iter_dir, metadata, [ck.replicated("wk", torch.empty(3))])
    assert ck.load_pieces(iter_dir, metadata, [ck.replicated("wk", torch.empty(3))], strict=False) == ["wk"]
    with pytest.raises(ck.CheckpointError, match=r"shape \(8, 12\)"):
        ck.load_pieces(iter_dir, metadata, [ck.replicated("wq", torch.empty(12, 8))])
    os.remove(os.path.join(iter_dir, ck.rank_filename(3)))
    with pytest.raises(ck.CheckpointError, match="rank_00003.pt is missing"):
        ck.load_pieces(iter_dir, metadata, [ck.replicated("wq", torch.empty(8, 12))])
    metadata["pieces"]["wq"] = [e for e in metadata["pieces"]["wq"] if e["file"] != ck.rank_filename(3)]
    with pytest.raises(ck.CheckpointError, match="cover"):
        ck.load_pieces(iter_dir, metadata, [ck.replicated("wq", torch.empty(8, 12))])


def test_a_view_saves_only_its_own_bytes(tmp_path):
    buffer = torch.zeros(1_000_000)
    piece = ck.ShardedTensor("w", buffer[10:20], (10,), (0,))
    ck.write_rank_file(str(tmp_path), 0, [piece], {})
    assert os.path.getsize(tmp_path / ck.rank_filename(0)) < 20_000


def test_single_process_save_and_rng_round_trip(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    state = ck.capture_rng_state(extra={"model-parallel-rng": torch.get_rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(3))
    ck.save_checkpoint(str(tmp_path), 42, [ck.replicated("w", torch.ones(4))], state, {"config": {"a": 1}})
    assert (tmp_path / ck.TRACKER_FILENAME).read_text() == "42\n"
    iteration, iter_dir, metadata = ck.latest_checkpoint(str(tmp_path))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    extra = ck.restore_rng_state(ck.read_rank_state(iter_dir, 0))  # weights_only load inside
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])
    assert set(extra) == {"model-parallel-rng"}
