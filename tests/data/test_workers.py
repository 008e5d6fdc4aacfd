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


def _slow_first(task: int) -> int:
    import time

    time.sleep(0.2 if task == 0 else 0.0)  # later tasks finish first: results still come in order
    return task


def test_results_stay_in_order_and_read_ahead_is_bounded():
    pulled = []

    def tasks():
        for i in range(30):
            pulled.append(i)
            yield i

    consumed = 0
    with worker_results(_slow_first, tasks(), 2, _init, (0,)) as results:
        for value in results:
            assert value == consumed
            consumed += 1
            assert len(pulled) - consumed <= 4  # two tasks per worker submitted and not yet yielded
    assert consumed == 30


def _echo_big(task: bytes) -> bytes:
    return task[::-1] * 2


def test_tasks_and_results_larger_than_a_pipe_do_not_deadlock():
    """The parent sends a worker its next task while that worker may be sending a result."""
    tasks = [bytes([i]) * (3 << 20) + b"end" for i in range(12)]
    with worker_results(_echo_big, iter(tasks), 2, _init, (0,)) as results:
        assert [len(r) for r in results] == [2 * len(t) for t in tasks]


def _die(task: int) -> int:
    if task == 3:
        os._exit(7)
    return task


def test_a_worker_that_dies_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="terminated abruptly"):
        with worker_results(_die, iter(range(10)), 2, _init, (0,)) as results:
            list(results)


class _Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("not picklable")


def _raise(task: int) -> int:
    if task == 1:
        raise ValueError("bad value in task 1")
    if task == 2:
        raise _Unpicklable("lock held")
    return task


def test_worker_errors_keep_their_type_and_traceback():
    with pytest.raises(ValueError, match="bad value in task 1") as info:
        with worker_results(_raise, iter([0, 1]), 2, _init, (0,)) as results:
            list(results)
    assert "_raise" in str(info.value.__cause__)  # where the worker raised
    with pytest.raises(TypeError, match="not picklable"):  # what stopped the error from being sent back
        with worker_results(_raise, iter([0, 2]), 2, _init, (0,)) as results:
            list(results)


def _fail_slowly_first(task: int) -> int:
    import time

    if task == 0:
        time.sleep(0.3)
        raise ValueError("first failure")
    raise ValueError("later failure")


def test_the_first_failing_task_in_input_order_is_the_error_raised():
    """Strict mode must name the first bad line, whichever worker finishes first."""
    with pytest.raises(ValueError, match="first failure"):
        with worker_results(_fail_slowly_first, iter(range(4)), 2, _init, (0,)) as results:
            list(results)
