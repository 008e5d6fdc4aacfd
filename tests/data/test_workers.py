"""The preprocessing tools' shared worker pool and all-or-nothing outputs (megallama.data.workers)."""
import os

import numpy as np
import pytest

from megallama.data.indexed import IndexedDataset, IndexedDatasetWriter
from megallama.data.workers import all_or_nothing, worker_results

_offset = {}


def _init(offset: int) -> None:
    _offset["value"] = offset


def _work(task: int) -> tuple:
    if task < 0:
        raise RuntimeError("bad task")
    return task + _offset["value"], os.getpid()


@pytest.mark.parametrize("workers", [1, 2])
def test_results_are_in_input_order_from_initialized_workers(workers):
    with worker_results(_work, iter(range(40)), workers, _init, (100,)) as results:
        values, pids = zip(*results)
    assert list(values) == [100 + i for i in range(40)]
    assert (os.getpid() in pids) == (workers == 1)


def test_a_failure_in_a_worker_leaves_no_output_and_success_finalizes(tmp_path):
    writers = [IndexedDatasetWriter(str(tmp_path / name), np.int32) for name in ("a", "b")]
    with pytest.raises(RuntimeError, match="bad task"):
        with all_or_nothing(writers), worker_results(_work, iter([1, 2, -1, 3]), 2, _init, (0,)) as results:
            for value, _ in results:
                for writer in writers:
                    writer.add_document(np.array([value], dtype=np.int32))
    assert list(tmp_path.iterdir()) == []
    writer = IndexedDatasetWriter(str(tmp_path / "c"), np.int32)
    with all_or_nothing([writer]):
        writer.add_document(np.array([7], dtype=np.int32))
    assert IndexedDataset(str(tmp_path / "c"))[0].tolist() == [7]


def _sigterm_action(task: int) -> bool:
    import signal

    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_workers_end_on_sigterm_whatever_handler_the_parent_has():
    """A Python SIGTERM handler inherited from the parent (Ray's driver installs one) runs only in
    a worker's main thread, which may be blocked on the task queue's lock while its parent-watching
    thread receives the signal: Pool.terminate() then waited forever (seen as a hung test run). The
    workers take the default action, which ends them from any thread."""
    import signal

    from megallama.executors import LocalExecutor

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        with worker_results(_sigterm_action, iter(range(4)), 2, _init, (0,)) as results:
            assert list(results) == [True] * 4
        assert LocalExecutor(2).run(_sigterm_action, [(0,), (1,)]) == [True, True]
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the parent keeps its own
    finally:
        signal.signal(signal.SIGTERM, previous)
