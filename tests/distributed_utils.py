"""Run a test function on several gloo ranks (CPU processes) and fail, never hang, on any error.

Usage from a test module (the function must be defined at module level so that spawn can pickle it)::

    from tests.distributed_utils import run_distributed

    def _check(n):                    # runs on every rank, process group already initialised
        rank = torch.distributed.get_rank()
        ...
        return some_tensor           # optional: returned to the parent, one entry per rank

    def test_something():
        results = run_distributed(_check, 2, 7)

Each rank runs ``fn(*args)`` with ``torch.distributed`` initialised (gloo, a file store in a fresh
temporary folder, so concurrent test runs never fight over a port) and ``torch.set_num_threads(1)``.
The first rank to raise makes the others terminate and the parent raise ``RankError`` with every
failed rank's traceback, the earliest first (the root cause, not a peer's "connection closed"); a
run that outlives ``timeout`` seconds is killed and reported with the ranks still alive.
Results must be what ``torch.load(weights_only=True)`` accepts (tensors, numbers, str, lists, dicts).
"""
import datetime
import glob
import os
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


class RankError(RuntimeError):
    """One or more ranks of a distributed test raised or died."""


def _worker(rank, fn, world_size, workdir, collective_timeout, backend, args):
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        init_method="file://" + os.path.join(workdir, "store"),
        rank=rank,
        world_size=world_size,
        # A peer that died leaves collectives waiting; this bounds the wait below the test timeout.
        timeout=datetime.timedelta(seconds=collective_timeout),
    )
    try:
        result = fn(*args)
        path = os.path.join(workdir, f"result_{rank}.pt")
        torch.save(result, path + ".tmp")
        os.replace(path + ".tmp", path)
    except BaseException:
        # Written before this process exits (and so before its peers see the connection close),
        # stamped so that the parent can name the rank that failed first.
        with open(os.path.join(workdir, f"error_{rank}.txt"), "w") as f:
            f.write(f"{time.time()!r}\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size, *args, timeout=120.0, backend="gloo"):
    """Run ``fn(*args)`` on ``world_size`` ranks; return the list of per-rank results.

    ``backend="nccl"`` puts rank r on CUDA device r (mod the device count) first.

    Raises ``RankError`` (every failed rank's traceback, earliest first) if any rank raises or dies,
    and ``TimeoutError`` if the ranks are still running after ``timeout`` seconds (they are killed
    first).
    """
    with tempfile.TemporaryDirectory(prefix="megallama_dist_") as workdir:
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, workdir, max(5.0, timeout / 2), backend, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                # Raises as soon as one rank fails, after terminating the others.
                if context.join(timeout=max(0.0, deadline - time.monotonic())):
                    break
            except ProcessException as exc:
                raise RankError(_failure_report(workdir, exc)) from None
            if time.monotonic() >= deadline:
                alive = [rank for rank, p in enumerate(context.processes) if p.is_alive()]
                for process in context.processes:
                    process.kill()
                    process.join()
                raise TimeoutError(
                    f"distributed test {getattr(fn, '__name__', fn)!r} on {world_size} ranks did not "
                    f"finish within {timeout:.0f} s; ranks still running: {alive}"
                )
        return [
            torch.load(os.path.join(workdir, f"result_{rank}.pt"), weights_only=True)
            for rank in range(world_size)
        ]


def _failure_report(workdir, exc):
    reports = []
    for path in glob.glob(os.path.join(workdir, "error_*.txt")):
        with open(path) as f:
            stamp, text = f.read().split("\n", 1)
        rank = int(os.path.basename(path)[len("error_"):-len(".txt")])
        reports.append((float(stamp), rank, text))
    if not reports:  # died without a Python exception (killed, segfault): only spawn knows
        return f"rank {exc.error_index} failed: {exc}"
    reports.sort()
    return "\n\n".join(
        f"rank {rank} failed{' first' if i == 0 else ''}:\n{text}" for i, (_, rank, text) in enumerate(reports)
    )
