"""What the preprocessing tools share: batches encoded in worker processes, results in input
order, and output datasets that are renamed into place only when the whole run succeeds."""
from __future__ import annotations

import gc
import os
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from megallama.executors.local import bind_worker_lifetime, fork_context


def _start_worker(initializer: Callable, initargs: tuple, parent_pid: int) -> None:
    bind_worker_lifetime(parent_pid)
    initializer(*initargs)


def bounded_imap(pool, tasks: Iterable, max_in_flight: int, fn: Callable) -> Iterator:
    """Ordered results of ``fn`` over ``tasks`` with at most ``max_in_flight`` submitted and
    unfinished (``Pool.imap`` would read the whole input ahead into memory)."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= max_in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


@contextmanager
def worker_results(fn: Callable, tasks: Iterable, workers: int, initializer: Callable, initargs: tuple = ()):
    """Yields the ordered results of ``fn`` over ``tasks``: in this process when ``workers`` is 1,
    else in a pool of ``workers`` processes (two tasks each in flight at most), each set up by
    ``initializer(*initargs)`` and ended when the block exits or this process dies."""
    if workers == 1:
        initializer(*initargs)
        yield map(fn, tasks)
        return
    ctx = fork_context()
    # Frozen objects are not scanned by the workers' garbage collector, so forked workers
    # do not copy the parent's memory page by page (copy-on-write) when they collect.
    gc.freeze()
    pool = ctx.Pool(workers, initializer=_start_worker, initargs=(initializer, initargs, os.getpid()))
    gc.unfreeze()
    try:
        yield bounded_imap(pool, tasks, 2 * workers, fn)
    finally:
        pool.terminate()
        pool.join()


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
