"""A stage that fails mid-step makes every rank exit with an error: no rank hangs.

Unlike ``tests.distributed_utils.run_distributed`` (which terminates the peers of a failed rank),
this test lets every process run until it exits by itself and fails if any is still alive after a
deadline. Two failures: the failing process exits (its peers see the connections close), and the
failing process stays alive without answering (its peers give up at the process-group timeout,
then the peers of those see their connections close).
"""
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megallama.training.forward_step import llama_forward_step
from tests.pipeline import harness as H

PG_TIMEOUT_S = 4
HANG_AFTER_S = 60  # ranks still alive this long after the failure count as hung


class _FailingForwardStep:
    def __init__(self, hang: bool, fail_rank: int, workdir: str):
        self.calls, self.hang, self.fail_rank, self.workdir = 0, hang, fail_rank, workdir

    def __call__(self, data_iterator, chunk, input_tensor):
        self.calls += 1
        if dist.get_rank() == self.fail_rank and self.calls == 3:  # mid-way through the first step
            open(os.path.join(self.workdir, "failing"), "w").close()  # the hang clock starts
            if self.hang:
                time.sleep(2 * HANG_AFTER_S)  # alive but silent, as a wedged process would be
            raise RuntimeError("injected failure in stage 1")
        return llama_forward_step(data_iterator, chunk, input_tensor)


def _rank_main(rank, world_size, workdir, hang, fail_rank):
    torch.set_num_threads(1)
    # A generous timeout for the rendezvous of slowly starting processes, then a short one.
    dist.init_process_group("gloo", init_method="file://" + os.path.join(workdir, "store"), rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=300))
    dist.barrier()
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        H.parallel_run(H.config(), 1, 2, None, 1, False, 3, forward_step=_FailingForwardStep(hang, fail_rank, workdir))
    except BaseException as exc:
        with open(os.path.join(workdir, f"error_{rank}.txt"), "w") as f:
            f.write(f"{time.monotonic()!r}\n{type(exc).__name__}: {exc}")
        raise


def _run(tmp_path, hang, world_size, fail_rank):
    """Train PP 2 × DP world/2 with ``fail_rank`` failing (or wedged) mid-step, until every rank
    but a wedged one exited; returns {rank: (time, error)}."""
    context = mp.start_processes(_rank_main, args=(world_size, str(tmp_path), hang, fail_rank),
                                 nprocs=world_size, join=False, start_method="spawn")
    peers = [r for r in range(world_size) if not (hang and r == fail_rank)]
    # Slow process start-up on a busy machine is not a hang: the clock starts at the failure.
    deadline = time.monotonic() + 300
    while not (tmp_path / "failing").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    deadline = min(deadline, time.monotonic() + HANG_AFTER_S)
    while any(context.processes[r].is_alive() for r in peers) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [r for r in peers if context.processes[r].is_alive()]
    for p in context.processes:
        p.kill()
        p.join()
    assert (tmp_path / "failing").exists(), "the failing stage never reached its failure"
    assert not alive, f"ranks {alive} still running {HANG_AFTER_S} s after a stage failed: a hang"
    errors = {}
    for rank in peers:
        path = tmp_path / f"error_{rank}.txt"
        assert path.exists(), f"rank {rank} exited without an error"
        stamp, text = path.read_text().split("\n", 1)
        errors[rank] = (float(stamp), text)
        assert context.processes[rank].exitcode == 1
    return errors


def test_failing_stage_exits_every_rank(tmp_path):
    # Global rank 2 is stage 1 of DP replica 0: its failure must reach its stage-0 peer (p2p) and
    # its DP peer (gradient buckets), and through them the other replica's stage 0.
    errors = _run(tmp_path, hang=False, world_size=4, fail_rank=2)
    assert "injected failure in stage 1" in errors[2][1]


def test_wedged_stage_peers_exit_at_the_process_group_timeout(tmp_path):
    # The wedged rank never answers: its peers must give up by themselves (it is killed after).
    errors = _run(tmp_path, hang=True, world_size=2, fail_rank=1)
    assert 1 not in errors
    for rank, (_, text) in errors.items():
        assert "timed out" in text.lower() or "connection closed" in text.lower(), (rank, text)
    assert any("timed out" in text.lower() for _, text in errors.values()), errors
