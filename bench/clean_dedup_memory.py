#!/usr/bin/env python
"""Benchmark: memory of the cross-shard dedup as the corpus grows (1x, 2x, 4x).

The same generated web pages as bench/clean.py (commoncrawl: exact + CCNet line dedup), in
shards of a fixed size, so a bigger corpus has more shards. The number of dedup partitions is
chosen from the corpus size (one per --partition-bytes of input, as the runner does by default
with 1 GiB), so each partition task holds about the same number of hashes. Every dedup task runs
alone in a fresh process, whose peak RSS is read when it ends; printed: the largest task's peak
RSS at each size, its ratio to the 1x figure (target < 1.3 at 2x and 4x), and the same with one
partition for the whole corpus (every hash in one process, as before partitioning) for contrast.
"Above baseline" subtracts the peak RSS of a fresh process that only imports the same modules.

  python bench/clean_dedup_memory.py --docs 20000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from benchlib import add_json_flag, ratio_row, write_json
from clean import generate
from megallama.clean import runner
from megallama.executors import Executor, LocalExecutor

SCALES = (1, 2, 4)


def measured(fn, task: tuple):
    """Run fn(*task) in this (fresh) process; its result and this process's peak RSS in MB. Read
    from VmHWM, which starts anew at exec (getrusage's ru_maxrss keeps the peak of the parent
    that forked this process)."""
    result = fn(*task) if fn is not None else None
    with open("/proc/self/status") as f:
        hwm_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return result, hwm_kb / 1024


class DedupMeasuringExecutor(Executor):
    """Shard tasks on a local pool; each dedup partition task alone in a fresh process, measured."""

    def __init__(self, workers: int) -> None:
        self.local = LocalExecutor(workers)
        self.cpus = workers
        self.peaks: list[float] = []

    def run(self, fn, tasks, desc="", progress=False, unit="doc"):
        if fn is not runner._dedup_partition:
            return self.local.run(fn, tasks, desc, progress, unit)
        results = []
        for task in tasks:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as fresh:
                result, peak = fresh.submit(measured, fn, task).result()
            results.append(result)
            self.peaks.append(peak)
        return results


def baseline_rss() -> float:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as fresh:
        return fresh.submit(measured, None, ()).result()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=20000, help="documents at 1x (default 20000)")
    p.add_argument("--docs-per-shard", type=int, default=2500, help="shard size, the same at every scale (default 2500)")
    p.add_argument("--partitions", type=int, default=2, help="dedup partitions at 1x (default 2); scaled with the input")
    p.add_argument("--workers", type=int, default=2, help="processes for the shard tasks (default 2)")
    add_json_flag(p)
    args = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="bench-dedup-mem-")
    peaks: dict[str, dict[int, float]] = {"partitioned": {}, "one partition": {}}
    partitions: dict[int, int] = {}
    try:
        bytes_per_partition = None
        for scale in SCALES:
            data = os.path.join(tmp, f"data{scale}")
            os.makedirs(data)
            docs = args.docs * scale
            paths = generate(data, docs, docs // args.docs_per_shard, seed=scale)
            if bytes_per_partition is None:
                bytes_per_partition = -(-sum(os.path.getsize(x) for x in paths) // args.partitions)
            partitions[scale] = runner.dedup_partitions_for(paths, bytes_per_partition)
            for mode, n in (("partitioned", partitions[scale]), ("one partition", 1)):
                executor = DedupMeasuringExecutor(args.workers)
                out = os.path.join(tmp, f"out{scale}-{n}")
                runner.clean_corpus("commoncrawl", paths, out, out + ".json", executor=executor,
                                    dedup_partitions=n, progress=False)
                shutil.rmtree(out)
                peaks[mode][scale] = max(executor.peaks)
                print(f"  {scale}x: {docs} docs, {len(paths)} shards, {n:2d} partitions: largest dedup task "
                      f"{peaks[mode][scale]:6.1f} MB", flush=True)
            shutil.rmtree(data)
        base = baseline_rss()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\npeak RSS of the largest dedup task (baseline: a fresh process with the same imports, {base:.1f} MB)")
    print(f"{'':<16}" + "".join(f"{f'{s}x':>26}" for s in SCALES))
    for mode, by_scale in peaks.items():
        cells = "".join(f"{v:8.1f} MB ({v / by_scale[1]:4.2f}x) {v - base:5.1f} above"
                        for v in by_scale.values())
        print(f"{mode:<16}{cells}")
    rows = [ratio_row("clean dedup memory", f"peak RSS of the largest dedup task, {s}x corpus "
                      f"({partitions[s]} partitions)", "the same at 1x", peaks["partitioned"][s] / peaks["partitioned"][1],
                      "< 1.3×") for s in SCALES[1:]]
    write_json(args.json, rows, {"docs_1x": args.docs, "docs_per_shard": args.docs_per_shard, "partitions": partitions,
                                 "peak_rss_mb": peaks, "baseline_rss_mb": base})
    return 0


if __name__ == "__main__":
    sys.exit(main())
