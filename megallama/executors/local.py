"""The local executor: a process pool on this machine (in-process for one worker or one task)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Sequence

from tqdm.auto import tqdm

from megallama.executors.base import Executor, set_progress

PARENT_POLL_SECONDS = 0.5


def bind_worker_lifetime(parent_pid: int) -> None:
    """In a worker process: end on SIGTERM, and exit as soon as `parent_pid` is gone.

    A fork inherits the parent's Python SIGTERM handler (Ray's driver installs one, so does the
    trainer's exit handling). Python handlers run in the main thread only, and the kernel may hand
    the signal to the watcher thread below while the main thread waits on the task queue's lock:
    the handler never runs and `Pool.terminate()` then waits for the worker forever. The default
    action ends the process whichever thread receives it.

    A pool worker also blocks forever on its task pipe after kill -9 of its parent, since the
    worker holds that pipe's write end too and never sees end-of-file: the watcher exits it."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def fork_context():
    """fork where the platform has it (workers then share the parent's loaded models), else spawn."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


class _SharedCounter:
    """Units done, summed over worker processes; the parent polls `value`."""

    def __init__(self, ctx) -> None:
        self._value = ctx.Value("q", 0)

    def __call__(self, n: int) -> None:
        with self._value.get_lock():
            self._value.value += n

    @property
    def value(self) -> int:
        return self._value.value


def _init_worker(parent_pid: int, counter: _SharedCounter) -> None:
    bind_worker_lifetime(parent_pid)
    set_progress(counter)


class LocalExecutor(Executor):
    """`workers` processes forked from this one; tasks run in this process when there is only
    one worker or one task (so a debugger or a monkeypatch sees them)."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.cpus = workers

    def run(self, fn: Callable, tasks: Sequence[tuple], desc: str = "", progress: bool = False,
            unit: str = "doc") -> list:
        results: list = [None] * len(tasks)
        bar = tqdm(desc=desc, unit=unit, disable=not progress or not tasks, mininterval=0.5)
        try:
            if self.cpus <= 1 or len(tasks) <= 1:
                set_progress(bar.update)
                try:
                    for i, task in enumerate(tasks):
                        results[i] = fn(*task)
                        bar.set_postfix(tasks=f"{i + 1}/{len(tasks)}", refresh=False)
                finally:
                    set_progress(None)
                return results
            ctx = fork_context()
            counter = _SharedCounter(ctx)
            with ProcessPoolExecutor(min(self.cpus, len(tasks)), mp_context=ctx, initializer=_init_worker,
                                     initargs=(os.getpid(), counter)) as pool:
                index = {pool.submit(fn, *task): i for i, task in enumerate(tasks)}
                pending, finished = set(index), 0
                try:
                    while pending:
                        done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                        for fut in done:
                            results[index[fut]] = fut.result()
                            finished += 1
                        bar.set_postfix(tasks=f"{finished}/{len(tasks)}", refresh=False)
                        bar.update(counter.value - bar.n)
                except BaseException:
                    # a failed task or Ctrl-C: leaving the block would otherwise run every queued task first
                    pool.shutdown(cancel_futures=True)
                    raise
            return results
        finally:
            bar.close()
