"""Gradient-accumulation fusion on and off: ``megallama.pretrain`` with its default (the linear layers'
weight-gradient GEMMs add into the fp32 main gradients themselves, Megatron's
``--gradient-accumulation-fusion``) against ``--no-gradient-accumulation-fusion`` (a gradient in the
weights' dtype, then an add into the fp32 buffer: what Megatron does without apex).

Both are real launches of the entry point, alternating for ``--rounds`` rounds, figures from each
run's log line (tokens/s over the second half); medians. On CPU: fp32, ``bench/pretrain.py``'s CPU
model on one process × 2 threads. On a GPU: bf16, its 16×2048 model, where the unfused add is a
mixed-dtype elementwise pass over every weight per micro-batch (4% of the H200's time in
``bench/results/profiles_16x2048_h200.txt``).

    python bench/grad_accumulation_fusion.py             # CPU here, or the GPU when there is one
    python bench/grad_accumulation_fusion.py --rounds 1  # quicker
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys

import torch

from benchlib import add_json_flag, ratio_row, write_json
from pretrain import CPU_MODEL, GPU_MODEL, run_megallama

SIDES = {"fused": [], "unfused": ["--no-gradient-accumulation-fusion"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds; medians are reported.")
    parser.add_argument("--iters", type=int, default=8, help="Iterations per run (the second half is timed).")
    parser.add_argument("--threads", type=int, default=2, help="Threads of the one process (CPU).")
    add_json_flag(parser)
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    m = GPU_MODEL if gpu else CPU_MODEL
    precision = ["--bf16"] if gpu else []
    device = torch.cuda.get_device_name() if gpu else "CPU"
    results: dict[str, list] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        order = list(SIDES) if r % 2 == 0 else list(reversed(SIDES))
        for side in order:
            results[side].append(run_megallama(m, args.iters, 1, args.threads, [*SIDES[side], *precision]))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    medians = {side: statistics.median(s["tokens_per_s"] for s in samples) for side, samples in results.items()}
    print(f"\n{device}, {'bf16' if gpu else 'fp32'}; model {m}")
    for side, tokens in medians.items():
        runs = ", ".join(f"{s['tokens_per_s']:.1f}" for s in results[side])
        print(f"{side:10s} {tokens:10.1f} tokens/s  (runs: {runs})")
    ratio = medians["fused"] / medians["unfused"]
    print(f"\nfused / unfused tokens/s: {ratio:.3f}×")
    label = f"pretrain, gradient-accumulation fusion, {'1 GPU bf16' if gpu else 'CPU fp32'}"
    write_json(args.json, [ratio_row(label, "tokens/s", "--no-gradient-accumulation-fusion", ratio, "≥ 1.0×")],
               {"device": device, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                "command": " ".join(["python", *sys.argv]), "model": m, "runs": results, "medians": medians})


if __name__ == "__main__":
    main()
