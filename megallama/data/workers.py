"""What the preprocessing tools share: batches encoded in worker processes, results in input
order, and output datasets that are renamed into place only when the whole run succeeds.

The workers are a ``concurrent.futures.ProcessPoolExecutor``, not a ``multiprocessing.Pool``: a
worker that dies (killed, out of memory) fails the run with ``BrokenProcessPool`` where a Pool
waits forever, and a Pool's worker-maintenance thread spins while a result of megabytes of ids is
being received (thousands of wake-ups a run, measured), holding the GIL against the writer.
"""
from __future__ import annotations

import gc
import os
import signal
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from megallama.executors.local import bind_worker_lifetime, fork_context


def _start_worker(initializer: Callable, initargs: tuple, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends us
    bind_worker_lifetime(parent_pid)
    initializer(*initargs)


def bounded_map(pool: ProcessPoolExecutor, tasks: Iterable, max_in_flight: int, fn: Callable) -> Iterator:
    """Ordered results of ``fn`` over ``tasks`` with at most ``max_in_flight`` submitted and not
    yet yielded (``Executor.map`` would read the whole input ahead into memory). A task's error is
    raised in input order, so strict mode names the first bad line, whichever worker fails first."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.submit(fn, task))
        if len(pending) >= max_in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@contextmanager
def worker_results(fn: Callable, tasks: Iterable, workers: int, initializer: Callable, initargs: tuple = ()):
    """Yields the ordered results of ``fn`` over ``tasks``: in this process when ``workers`` is 1,
    else in a pool of ``workers`` processes (two tasks each in flight at most), each set up by
    ``initializer(*initargs)`` and ended when the block exits or this process dies."""
    if workers == 1:
        initializer(*initargs)
        yield map(fn, tasks)
        return
    # Frozen objects are not scanned by the workers' garbage collector, so forked workers
    # do not copy the parent's memory page by page (copy-on-write) when they collect.
    gc.freeze()
    try:
        pool = ProcessPoolExecutor(workers, mp_context=fork_context(), initializer=_start_worker,
                                   initargs=(initializer, initargs, os.getpid()))
        pool.submit(os.getpid).result()  # the workers fork now, while the heap is frozen
    finally:
        gc.unfreeze()
    try:
        yield bounded_map(pool, tasks, 2 * workers, fn)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def all_or_nothing(writers: Iterable):
    """Finalizes every ``IndexedDatasetWriter`` of ``writers`` when the block succeeds, aborts them
    all (no partial output left) when it raises, Ctrl-C included."""
    writers = list(writers)
    try:
        yield
        for writer in writers:
            writer.finalize()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
