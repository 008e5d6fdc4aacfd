"""Where shard tasks run: a local process pool, or a Ray cluster (the optional `cluster` extra).

The data tools hand an executor a function and a list of argument tuples; the executor only
decides where the calls run and gathers their results (in task order). Everything a task does —
reading, cleaning, writing — is the tool's own code, the same under every executor; tasks
communicate through files on a filesystem every worker can reach.
"""

from __future__ import annotations

from megallama.executors.base import Executor, report_progress
from megallama.executors.local import LocalExecutor

EXECUTORS = ("local", "ray")


def make_executor(kind: str = "local", workers: int = 1, ray_address: str | None = None) -> Executor:
    """`local`: `workers` processes on this machine. `ray`: every CPU of the cluster at
    `ray_address` (default: the running cluster if there is one, else a local one is started)."""
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        from megallama.executors.ray_cluster import RayExecutor

        return RayExecutor(ray_address)
    raise ValueError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")


__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "make_executor", "report_progress"]
