"""The Ray executor: shard tasks on every CPU of a Ray cluster (laptop, Slurm, KubeRay).

Ray is the optional `cluster` extra, imported only here. Tasks are Ray tasks with retries: a task
whose worker dies (killed, node lost) is run again, and since every task writes its outputs
atomically under fixed names, a redone task replaces rather than duplicates. Workers read the
inputs and write the outputs themselves, so every node must see the same paths (a shared
filesystem); results travel back through Ray only as small dicts.
"""

from __future__ import annotations

import socket
from typing import Callable, Sequence

from tqdm.auto import tqdm

from megallama.executors.base import Executor

MAX_RETRIES = 3  # per task, on worker or node death (a task's own exception is not retried)
CONNECT_TIMEOUT_S = 10.0


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeError("--executor ray needs Ray, an optional dependency: pip install -e .[cluster]") from None
    return ray


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A one-line RuntimeError unless something accepts a TCP connection at `address` (HOST:PORT,
    or ray://HOST:PORT for Ray Client). ray.init retries an unreachable head for minutes (20 tries
    of a 30 s GCS connect timeout in Ray 2.60); its knobs for that are RAY_* environment variables
    read process-wide, which would also reach a local cluster this process starts."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" and the like: Ray resolves them itself, without the long retries
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RuntimeError(f"--ray-address {address}: no Ray cluster answers there ({e.strerror or e}); "
                           "start one with `ray start --head` or fix the address") from None


def _result(ray, ref):
    """The task's return value; a task's own exception is raised as itself (e.g. a bad input line's
    one-line error), not wrapped in Ray's remote traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(getattr(e, "cause", None), Exception):
            raise e.cause from None
        raise


class RayExecutor(Executor):
    """Connects to the cluster at `address` (None: the running cluster if there is one, e.g. one
    started with `ray start`, else a local one is started and stopped again by close())."""

    def __init__(self, address: str | None = None, max_retries: int = MAX_RETRIES) -> None:
        ray = self._ray = _import_ray()
        self.max_retries = max_retries
        self._connected_here = not ray.is_initialized()
        if self._connected_here:
            if address:
                check_reachable(address)
            ray.init(address=address, log_to_driver=True, configure_logging=False)
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))

    def run(self, fn: Callable, tasks: Sequence[tuple], desc: str = "", progress: bool = False,
            unit: str = "doc") -> list:
        ray = self._ray
        remote = ray.remote(fn).options(num_cpus=1, max_retries=self.max_retries, retry_exceptions=False)
        index = {remote.remote(*task): i for i, task in enumerate(tasks)}
        results: list = [None] * len(tasks)
        bar = tqdm(desc=desc, total=len(tasks), unit="task", disable=not progress or not tasks, mininterval=0.5)
        pending = list(index)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
                for ref in done:
                    results[index[ref]] = _result(ray, ref)
                bar.update(len(done))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            bar.close()
        return results

    def close(self) -> None:
        if self._connected_here and self._ray.is_initialized():
            self._ray.shutdown()
            self._connected_here = False
