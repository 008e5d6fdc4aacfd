"""What every benchmark shares: the ``--json`` summary that ``bench/run_all.py`` turns into the
README's performance table, and peak-memory measurement in a child process (Linux)."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def add_json_flag(parser) -> None:
    parser.add_argument("--json", help="also write the figures (with a summary row per ratio) to this JSON file")


def ratio_row(benchmark: str, metric: str, peer: str, ratio: float, target: str = "") -> dict:
    """One line of the performance table: ``ratio`` is ours relative to ``peer`` for ``metric``."""
    return {"benchmark": benchmark, "metric": metric, "peer": peer, "ratio": float(ratio), "target": target}


def write_json(path: str | None, rows: list[dict], details: dict) -> None:
    """Atomically write ``{"summary": rows, "details": details}`` to ``path`` (no-op without one)."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"summary": rows, "details": details}, f, indent=2, default=str)
    os.replace(tmp, path)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def start_peak_rss() -> int:
    """In a memory child: reset this process's RSS high-water mark and return the RSS (KiB) the
    peak is measured from. (getrusage's maxrss would carry the parent's peak across fork+exec; the
    kernel's high-water mark can be reset instead.)"""
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return base


def print_peak_rss(base_kib: int) -> None:
    """In a memory child: print the peak over ``base_kib`` for ``peak_rss_of`` to read."""
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - base_kib) / 1024}))


def peak_rss_of(script: str, argv: list[str]) -> float:
    """Run the memory child ``script argv`` in a fresh process; the peak MiB it printed."""
    out = subprocess.run([sys.executable, script, *argv], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]
