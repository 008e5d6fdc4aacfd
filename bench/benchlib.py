"""What every benchmark shares: the ``--json`` summary that ``bench/run_all.py`` turns into the
README's performance table."""
from __future__ import annotations

import json
import os


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
