"""Run the benchmarks and rewrite the README's performance table from their ``--json`` summaries.

    python bench/run_all.py                 # all, then README.md's table
    python bench/run_all.py --only train_step generate
    python bench/run_all.py --table-only    # rebuild the table from the stored results
    python bench/run_all.py --store-gpu DIR # store a GPU session's results (bench/gpu_session.sh DIR)

Each benchmark is a script of its own in ``bench/`` that measures a ratio against its peer in one
run. Its summary is stored in ``bench/results/NAME.json`` with the machine and date, and the table
is made from all stored results, so rerunning one benchmark refreshes only its rows.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")
RESULTS = os.path.join(HERE, "results")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# name → extra arguments (the configs are each script's defaults)
BENCHMARKS = {
    "train_step": [],
    "ops": [],
    "tensor_parallel": [],
    "zero_overlap": [],
    "pipeline": [],
    "pretrain": [],
    "grad_accumulation_fusion": [],
    "vocab_parallel_loss": [],
    "generate": [],
    "finetune": ["--threads", "2"],  # both cores, as the other benchmarks; each side alternates step by step
    "data": [],
    "clean": ["--perplexity"],  # also the whole pipeline with CCNet's n-gram filter (~40 s more on 2 cores)
    "clean_ray": ["--executor", "ray"],
    "clean_dedup_memory": [],
    "perplexity": [],
}
SCRIPTS = {"clean_ray": "clean"}  # results stored under a name of their own, made by another script
# Measured on a lent GPU machine by bench/gpu_session.sh (no GPU here): NAME → its JSON under the
# session's output folder, stored by --store-gpu and shown in the table with the others.
GPU_RESULTS = {"pretrain_gpu_peers": "peers_16x2048/pretrain_gpu_peers.json",
               "pretrain_gpu_peers_7b": "peers_7b_cut/pretrain_gpu_peers.json",
               "grad_accumulation_fusion_gpu": "grad_accumulation_fusion.json"}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def store(name: str, result: dict) -> None:
    """Write ``result`` as ``bench/results/NAME.json`` (temp file, then rename)."""
    os.makedirs(RESULTS, exist_ok=True)
    tmp = os.path.join(RESULTS, f"{name}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, os.path.join(RESULTS, f"{name}.json"))


def run(name: str, extra: list[str]) -> bool:
    """Run one benchmark; on success store its summary with the machine and date."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.join(HERE, f"{SCRIPTS.get(name, name)}.py"), *extra, "--json", out]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not os.path.exists(out):
            print(f"!! {name} failed (exit {proc.returncode}); its stored rows are kept", flush=True)
            return False
        with open(out) as f:
            result = json.load(f)
    result.update(machine=machine(), date=datetime.date.today().isoformat(),
                  command=f"python bench/{SCRIPTS.get(name, name)}.py {' '.join(extra)}".strip())
    store(name, result)
    return True


def store_gpu(session_dir: str) -> None:
    """Store each of GPU_RESULTS found under ``session_dir`` as run() stores a benchmark's (a part
    the session did not run keeps its stored result)."""
    found = [name for name, relative in GPU_RESULTS.items() if os.path.exists(os.path.join(session_dir, relative))]
    if not found:
        raise SystemExit(f"--store-gpu: none of {', '.join(GPU_RESULTS.values())} under {session_dir}")
    for name in found:
        path = os.path.join(session_dir, GPU_RESULTS[name])
        with open(path) as f:
            result = json.load(f)
        details = result["details"]
        # The command without the session machine's output paths.
        command = re.sub(r" --(json|profile-dir) \S+", "", details["command"])
        result.update(machine=f"{details['device']}, torch {details['torch']}", date=details["date"],
                      command=command)
        store(name, result)
        print(f"stored {path} as bench/results/{name}.json")


def table() -> str:
    lines = ["| benchmark | metric | peer | ours / peer | target | command | measured on |",
             "|---|---|---|---|---|---|---|"]
    for name in [*BENCHMARKS, *GPU_RESULTS]:
        path = os.path.join(RESULTS, f"{name}.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            result = json.load(f)
        for r in result["summary"]:
            lines.append(f"| {r['benchmark']} | {r['metric']} | {r['peer']} | **{r['ratio']:.2f}×** | "
                         f"{r['target']} | `{result['command']}` | {result['machine']}, {result['date']} |")
    return "\n".join(lines)


def rewrite_readme(text: str) -> None:
    with open(README) as f:
        readme = f.read()
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the {START} … {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    tmp = README + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{head}{START}\n{text}\n{END}{tail}")
    os.replace(tmp, README)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    p.add_argument("--table-only", action="store_true", help="run nothing; rebuild the table from bench/results/")
    p.add_argument("--store-gpu", metavar="DIR", help="store the results a GPU session (bench/gpu_session.sh DIR) "
                   "wrote under DIR, then rebuild the table; runs nothing")
    args = p.parse_args()
    failed = []
    if args.store_gpu:
        store_gpu(args.store_gpu)
    elif not args.table_only:
        failed = [name for name in args.only or BENCHMARKS if not run(name, BENCHMARKS[name])]
    text = table()
    print(text)
    rewrite_readme(text)
    print(f"rewrote the performance table in {README}")
    if failed:
        raise SystemExit(f"benchmarks that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
