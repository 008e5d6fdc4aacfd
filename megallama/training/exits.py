"""When a run stops early, and every rank agreeing on it: Megatron's ``--exit-signal-handler``,
``--exit-duration-in-mins`` and ``--exit-interval``.

Slurm and Kubernetes send SIGTERM before a preemption or at the time limit and torchrun forwards it
to its workers (then waits its shutdown timeout before SIGKILL). The handler only notes the signal,
however often it comes (Ctrl-C under torchrun reaches a worker twice: from the terminal and
forwarded); the loop asks after every iteration. A signal or a clock reaches ranks at different
moments, so the answer is all-reduced (MAX) over the world each iteration: every rank stops after
the same iteration, saves with the others, and exits 0. The values are host values and so is the
collective (gloo, on a group of its own when the training device is not the CPU): a collective on
the device would make the host wait every iteration for the device to finish the step.
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclass
class ExitSettings:
    signal_handler: bool = False
    duration_in_mins: Optional[float] = None
    interval: Optional[int] = None


class ExitWatch:
    """Answers "stop after this iteration?" the same way on every rank."""

    def __init__(self, settings: ExitSettings, device: torch.device, start: Optional[float] = None):
        """``start``: the ``time.monotonic()`` the duration counts from (default now)."""
        self.settings = settings
        self.start = time.monotonic() if start is None else start
        self.received: Optional[int] = None
        agreeing = settings.signal_handler or settings.duration_in_mins is not None
        self.group = None  # the world's (CPU runs: its backend takes host tensors)
        if agreeing and device.type != "cpu" and dist.is_initialized():
            self.group = dist.new_group(backend="gloo")  # every rank builds the watch alike: a collective

    def _note(self, signum, frame) -> None:
        self.received = signum

    @contextmanager
    def watching_signals(self) -> Iterator["ExitWatch"]:
        """Note the exit signals instead of dying of them (when enabled); the previous handlers after.
        Python lets only the main thread install handlers: a run driven from another thread keeps its own."""
        if not self.settings.signal_handler or threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._note) for sig in EXIT_SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def reason(self, iteration: int) -> Optional[str]:
        """Why the run stops after ``iteration`` (the same on every rank), or None to go on."""
        s = self.settings
        if s.interval and iteration % s.interval == 0:  # deterministic: no need to agree
            return f"--exit-interval {s.interval}"
        if not s.signal_handler and s.duration_in_mins is None:
            return None
        elapsed = time.monotonic() - self.start
        flags = torch.tensor([float(self.received or 0),
                              float(s.duration_in_mins is not None and elapsed > 60 * s.duration_in_mins)])
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        received, timed_out = flags.tolist()
        if received:
            return f"received {signal.Signals(int(received)).name}"
        if timed_out:
            return f"--exit-duration-in-mins {s.duration_in_mins:g} reached"
        return None
