"""The throughput model's constants, read from this repository's stored benchmark results.

* ``mfu``: the fraction of the bf16 peak the matrix multiplies (and attention) reach. Solved from the
  one-GPU run of ``bench/pretrain.py`` (``bench/results/pretrain_gpu_*.txt``): the planner's own step
  model for that run (compute at ``mfu`` + memory-bound elementwise work + the optimizer step at
  the HBM bandwidth) must give the measured tokens/s.
* ``bubble_1f1b`` / ``bubble_interleaved``: measured pipeline bubble over the textbook
  ``(p−1)/(m+p−1)`` (``/v`` interleaved), from ``bench/results/pipeline.json``.

Each constant carries the file and figure it came from, and the tool prints them.
"""
from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from megallama.config import LlamaConfig

DEFAULT_RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
_GPU_RUN = re.compile(r"^megallama 1 GPU bf16\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%", re.M)
_GPU_MODEL = re.compile(r"^(NVIDIA [^;]+); model (\{.*\})$", re.M)
# Which GPU table entry a stored device name is (first match).
_DEVICE_KEYS = (("H200", "h200-141gb"), ("H100", "h100-80gb"), ("A100-SXM4-40GB", "a100-40gb"),
                ("A100", "a100-80gb"), ("B200", "b200-180gb"))


class CalibrationError(RuntimeError):
    """The benchmark results the model is calibrated from are missing or unreadable."""


@dataclass(frozen=True)
class Constant:
    value: float
    source: str


@dataclass
class Calibration:
    mfu: Constant
    bubble_1f1b: Constant
    bubble_interleaved: Constant

    def to_dict(self) -> dict:
        return {name: {"value": c.value, "source": c.source}
                for name, c in (("mfu", self.mfu), ("bubble_1f1b", self.bubble_1f1b),
                                ("bubble_interleaved", self.bubble_interleaved))}


@dataclass(frozen=True)
class GpuMeasurement:
    """One stored single-GPU training run: what ran, where, and how fast."""

    gpu: str
    model: LlamaConfig
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    tokens_per_s: float
    source: str


def read_gpu_measurement(results_dir: Path) -> GpuMeasurement:
    files = sorted(results_dir.glob("pretrain_gpu_*.txt"))
    if not files:
        raise CalibrationError(f"no bench/results/pretrain_gpu_*.txt in {results_dir} (run `python "
                               "bench/pretrain.py` on a GPU and store its output there)")
    path = files[0]
    text = path.read_text()
    run, header = _GPU_RUN.search(text), _GPU_MODEL.search(text)
    if not run or not header:
        raise CalibrationError(f"{path}: no 'megallama 1 GPU bf16' line or model header")
    device = header.group(1)
    gpu = next((key for needle, key in _DEVICE_KEYS if needle in device), None)
    if gpu is None:
        raise CalibrationError(f"{path}: GPU {device!r} is not in the planner's table")
    m = ast.literal_eval(header.group(2))  # a dict literal: parsed, never evaluated
    model = LlamaConfig(num_layers=m["num_layers"], hidden_size=m["hidden_size"],
                        num_attention_heads=m["num_attention_heads"], ffn_hidden_size=m["ffn_hidden_size"],
                        vocab_size=m["vocab_size"], max_position_embeddings=m["seq_length"])
    tokens_per_s = float(run.group(1))
    source = (f"{os.path.join('bench', 'results', path.name)}: {tokens_per_s:,.0f} tokens/s "
              f"({run.group(3)}% whole-step MFU) on one {device}, {m['num_layers']} layers × "
              f"{m['hidden_size']}, micro-batch {m['micro_batch_size']}")
    return GpuMeasurement(gpu, model, m["seq_length"], m["micro_batch_size"], m["global_batch_size"],
                          tokens_per_s, source)


# The bubble rows of bench/pipeline.py that calibrate the plan: the schedules pretrain runs by
# default (the interleaved one overlaps its exchanges with compute, --overlap-p2p-communication).
BUBBLE_ROWS = {"1f1b": "PP=2 1F1B (v=1)", "interleaved": "PP=2 interleaved+overlap (v="}


def read_bubble_factors(results_dir: Path) -> tuple[Constant, Constant]:
    path = results_dir / "pipeline.json"
    try:
        rows = json.loads(path.read_text())["summary"]
    except (OSError, ValueError, KeyError) as error:
        raise CalibrationError(f"cannot read the pipeline benchmark {path}: {error}") from None
    found = {}
    for row in rows:
        for kind, name in BUBBLE_ROWS.items():
            if row["metric"].startswith("bubble fraction") and row["benchmark"].startswith(name):
                found[kind] = Constant(float(row["ratio"]), f"bench/results/pipeline.json: {row['benchmark']}, "
                                       f"measured bubble {row['ratio']:.2f}× {row['peer']}")
    if set(found) != set(BUBBLE_ROWS):
        raise CalibrationError(f"{path} lacks a bubble row of {' or '.join(BUBBLE_ROWS.values())}")
    return found["1f1b"], found["interleaved"]


def load_calibration(results_dir: Path | None = None) -> Calibration:
    """The constants from ``results_dir`` (default: this checkout's ``bench/results``)."""
    from megallama.planning.hardware import gpu_spec
    from megallama.planning.step_time import solve_mfu

    results_dir = Path(results_dir) if results_dir else DEFAULT_RESULTS
    measured = read_gpu_measurement(results_dir)
    mfu = solve_mfu(measured, gpu_spec(measured.gpu))
    bubble_1f1b, bubble_interleaved = read_bubble_factors(results_dir)
    return Calibration(Constant(mfu, measured.source), bubble_1f1b, bubble_interleaved)
