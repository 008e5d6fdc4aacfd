"""``--profile``: iterations [``--profile-step-start``, ``--profile-step-end``) of the ranks in
``--profile-ranks``, counted from 0 as Megatron does.

Without ``--use-pytorch-profiler`` the range is only marked (``torch.cuda.profiler.start/stop``)
for ``nsys profile --capture-range=cudaProfilerApi``. With it, ``torch.profiler`` records the range
itself (host operators, and device kernels on CUDA) and writes two files per rank into
``--tensorboard-dir``: ``rank{r}.iter{a}-{b}.pt.trace.json`` (a Chrome / Perfetto trace that
TensorBoard's profiler plugin lists too) and ``rank{r}.iter{a}-{b}.txt``, the operators sorted by
their own device time (host time on CPU): where an iteration's time goes, with no other tool.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megallama.fileio import atomic_open, atomic_path
from megallama.training.config import TrainingArgs

TABLE_ROWS = 40
NAME_WIDTH = 90  # device kernels' names are long; the default 55 cuts most of them
# Device kernels by what they compute, from their names, first match wins: attention first, since
# cuDNN's flash kernels name the wgmma instructions GEMMs use too ("..._sdpa_..._flash_bprop_wgmma_...").
KERNEL_KINDS = (("attention", ("flash", "fmha", "sdpa", "attention")),
                ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas")),
                ("communication", ("nccl",)))


def device_time_by_kind(kernels) -> dict:
    """Own device time (µs) of ``kernels`` ((name, µs) pairs) summed per kind of
    :data:`KERNEL_KINDS`, the rest under "other"."""
    totals = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
    for name, micros in kernels:
        lower = name.lower()
        kind = next((kind for kind, marks in KERNEL_KINDS if any(m in lower for m in marks)), "other")
        totals[kind] += micros
    return totals


class IterationProfiler:
    """Call ``before(i)`` ahead of iteration ``i`` and, once it is done, ``close()`` if
    ``ends_after(i + 1)``; ``close()`` also ends a range the run left early (files are written for what was recorded). ``table_path`` is
    the table this rank wrote, if any."""

    def __init__(self, training: TrainingArgs, output_dir: Optional[str], rank: int, device: torch.device):
        self.start, self.end = training.profile_step_start, training.profile_step_end
        self.output_dir, self.rank, self.device = output_dir, rank, device
        self.torch_profiler = training.use_pytorch_profiler
        self.enabled = training.profile and rank in training.profile_ranks and (
            self.torch_profiler or device.type == "cuda")
        self._recording: Optional[torch.profiler.profile] = None
        self._marking = False
        self.table_path: Optional[str] = None

    def before(self, iteration: int) -> None:
        if not self.enabled or iteration != self.start:
            return
        if self.torch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._recording = torch.profiler.profile(activities=activities)
            self._recording.__enter__()
        else:
            torch.cuda.profiler.start()
            self._marking = True

    def ends_after(self, iteration: int) -> bool:
        return self.enabled and iteration == self.end

    def close(self) -> None:
        """Ends the range, writing the files of a recorded one."""
        if self._marking:
            torch.cuda.profiler.stop()
            self._marking = False
        if self._recording is None:
            return
        recording, self._recording = self._recording, None
        recording.__exit__(None, None, None)
        self._write(recording)

    def _write(self, recording: torch.profiler.profile) -> None:
        stem = os.path.join(self.output_dir, f"rank{self.rank}.iter{self.start}-{self.end}")
        with atomic_path(stem + ".pt.trace.json") as temp:
            recording.export_chrome_trace(temp)
        on_device = self.device.type == "cuda"
        averages = recording.key_averages()
        table = averages.table(sort_by="self_device_time_total" if on_device else "self_cpu_time_total",
                               row_limit=TABLE_ROWS, max_name_column_width=NAME_WIDTH)
        summary = ""
        if on_device:
            kinds = device_time_by_kind((e.key, e.self_device_time_total) for e in averages
                                        if e.device_type == torch.autograd.DeviceType.CUDA
                                        and not getattr(e, "is_user_annotation", False))
            total = sum(kinds.values()) or 1.0
            iterations = self.end - self.start
            summary = (f"device kernels {total / iterations / 1e3:.1f} ms per iteration: " + ", ".join(
                f"{kind} {100 * micros / total:.1f}%" for kind, micros in kinds.items()) + "\n")
        with atomic_open(stem + ".txt", "w") as f:
            f.write(f"rank {self.rank}, iterations [{self.start}, {self.end}), sorted by own "
                    f"{'device' if on_device else 'host'} time\n{summary}{table}\n")
        self.table_path = stem + ".txt"
