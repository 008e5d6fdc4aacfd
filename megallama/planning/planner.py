"""Every layout of a run that fits the devices, ranked by predicted tokens/s per GPU.

``plan(request)`` enumerates TP (powers of two within a node, dividing heads and FFN), PP
(dividing the layers), the DP that fills the GPUs, micro-batch, interleaving, sequence
parallelism, recomputation and the distributed optimizer; keeps the layouts the trainer accepts
and whose peak memory (``memory.py``) fits ``memory × (1 − reserve)``; times each (``step_time.py``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from megallama.planning.calibration import Calibration
from megallama.planning.hardware import GpuSpec
from megallama.planning.layout import Layout, Workload
from megallama.planning.memory import RankMemory, training_memory
from megallama.planning.step_time import StepTime, step_time

# Kept free on each device for the CUDA context, NCCL and cuBLAS workspaces and the caching
# allocator's fragmentation (the planner's figures are bytes of live tensors).
DEFAULT_RESERVE = 0.10
MICRO_BATCH_CHOICES = (1, 2, 4, 8)


@dataclass
class PlanRequest:
    workload: Workload
    gpu: GpuSpec
    num_gpus: int
    train_tokens: float
    calibration: Calibration
    reserve: float = DEFAULT_RESERVE
    overlap_communication: bool = False
    # Restrict the search (None: every choice).
    tensor_parallel: tuple | None = None
    pipeline_parallel: tuple | None = None
    micro_batch_sizes: tuple = MICRO_BATCH_CHOICES
    overlap_param_gather: bool = False  # pretrain's --overlap-param-gather (implied by overlap_communication)

    @property
    def usable_bytes(self) -> float:
        return self.gpu.memory_bytes * (1 - self.reserve)


@dataclass
class Candidate:
    layout: Layout
    memory: list[RankMemory]
    time: StepTime
    days: float
    gpu_hours: float

    @property
    def peak(self) -> RankMemory:
        return max(self.memory, key=lambda r: r.total)

    def to_dict(self) -> dict:
        return {"layout": self.layout.to_dict(), "description": self.layout.describe(),
                "memory_per_gpu": self.peak.to_dict(), "memory_per_pipeline_rank": [r.to_dict() for r in self.memory],
                "step_time": self.time.to_dict(), "tokens_per_s_per_gpu": self.time.tokens_per_s_per_gpu,
                "days": self.days, "gpu_hours": self.gpu_hours}


@dataclass
class Plan:
    request: PlanRequest
    fitting: list[Candidate]
    considered: int
    leanest: Candidate | None = None   # the smallest peak of all valid layouts (fitting or not)
    problems: list = field(default_factory=list)

    def explain_no_fit(self) -> str:
        r = self.request
        if self.leanest is None:
            reasons = "; ".join(sorted(set(self.problems))[:4]) or "no layout divides the GPUs"
            return f"no layout of {r.num_gpus} GPUs can run this model and batch: {reasons}"
        lean = self.leanest.peak
        gb = 1e9
        return (f"nothing fits {r.gpu.name} ({r.usable_bytes / gb:.1f} GB usable of {r.gpu.memory_gb:g} GB, "
                f"{r.reserve:.0%} kept free): the leanest of {self.considered} layouts, "
                f"{self.leanest.layout.describe()}, needs {lean.total / gb:.1f} GB on pipeline rank "
                f"{lean.pipeline_rank} — weights {lean.weights / gb:.1f}, gradients {lean.gradients / gb:.1f}, "
                f"main weights {lean.main_weights / gb:.1f}, Adam {lean.optimizer_states / gb:.1f}, "
                f"activations {lean.activations / gb:.1f} ({lean.inflight_forwards} chunk forwards in flight), "
                f"working buffers {lean.working_buffers / gb:.1f} GB at the {lean.peak_moment}; "
                "use more GPUs, a larger device, or a shorter sequence")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(request: PlanRequest):
    w, gpus = request.workload, request.num_gpus
    m = w.model
    tps = request.tensor_parallel or [t for t in (1, 2, 4, 8, 16) if t <= min(gpus, request.gpu.gpus_per_node)]
    pps = request.pipeline_parallel or _divisors(m.num_layers)
    for tp, pp in itertools.product(tps, pps):
        if gpus % (tp * pp):
            continue
        dp = gpus // (tp * pp)
        for mb, v, sp, recompute, dist_opt in itertools.product(
                request.micro_batch_sizes, _divisors(m.num_layers // pp) if pp > 1 and m.num_layers % pp == 0 else [1],
                (False, True) if tp > 1 else (False,), ("none", "full"), (False, True) if dp > 1 else (False,)):
            yield Layout(tp, pp, dp, mb, v, sp, recompute, dist_opt)


def evaluate(request: PlanRequest, layout: Layout) -> Candidate:
    c = request.calibration
    memory = training_memory(request.workload, layout)
    time = step_time(request.workload, layout, request.gpu, c.mfu.value, c.bubble_1f1b.value,
                     c.bubble_interleaved.value, request.overlap_communication, request.overlap_param_gather)
    per_gpu = time.tokens_per_s_per_gpu
    return Candidate(layout, memory, time, request.train_tokens / (per_gpu * layout.world_size) / 86400,
                     request.train_tokens / per_gpu / 3600)


def plan(request: PlanRequest) -> Plan:
    """All fitting layouts, fastest first (ties: less memory first)."""
    if request.num_gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {request.num_gpus}")
    fitting, problems, considered, leanest = [], [], 0, None
    for layout in candidate_layouts(request):
        why = layout.problems(request.workload)
        if why:
            problems.extend(why)
            continue
        considered += 1
        candidate = evaluate(request, layout)
        if leanest is None or candidate.peak.total < leanest.peak.total:
            leanest = candidate
        if candidate.peak.total <= request.usable_bytes:
            fitting.append(candidate)
    fitting.sort(key=lambda c: (-c.time.tokens_per_s_per_gpu, c.peak.total))
    return Plan(request, fitting, considered, leanest, problems)
