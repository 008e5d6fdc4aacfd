"""The spawn helper every multi-process test relies on: results come back, errors and hangs fail."""
import time

import pytest
import torch
import torch.distributed as dist
from tests.distributed_utils import RankError, run_distributed



def _sum_of_ranks(offset):
    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t}


def _rank_one_raises():
    if dist.get_rank() == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # rank 0 would wait here for ever without the helper


def _hangs():
    time.sleep(60)


def test_results_come_back_per_rank():
    results = run_distributed(_sum_of_ranks, 2, 10)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 for r in results)
    assert all(r["sum"].item() == 21.0 for r in results)


def test_error_on_one_rank_fails_the_test_without_hanging():
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 failed first:(.|\n)*rank one is broken"):
        run_distributed(_rank_one_raises, 2, timeout=60)
    assert time.monotonic() - start < 30


def test_hang_is_killed_at_the_timeout():
    with pytest.raises(TimeoutError, match=r"ranks still running: \[0, 1\]"):
        run_distributed(_hangs, 2, timeout=5)
