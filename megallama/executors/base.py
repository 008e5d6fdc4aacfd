"""The executor interface, and the progress channel tasks report through."""

from __future__ import annotations

from typing import Callable, Sequence

_PROGRESS: Callable[[int], None] | None = None  # where this process reports work done


def set_progress(sink: Callable[[int], None] | None) -> None:
    """Route report_progress() in this process to `sink` (None: drop reports)."""
    global _PROGRESS
    _PROGRESS = sink


def report_progress(n: int) -> None:
    """Called by tasks: `n` more units (documents) done. A no-op where nobody listens."""
    if _PROGRESS is not None and n:
        _PROGRESS(n)


class Executor:
    """Runs `fn(*task)` for each task; results come back in task order."""

    cpus: int = 1

    def run(self, fn: Callable, tasks: Sequence[tuple], desc: str = "", progress: bool = False,
            unit: str = "doc") -> list:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
