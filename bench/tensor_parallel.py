"""Forward + backward tokens/s of the LLaMA model at TP=2 (2 gloo processes x 1 thread, with and
without sequence parallelism) against TP=1 (1 process x 1 thread and x 2 threads), CPU fp32.

Three processes are spawned: the two TP=2 ranks and one holding the serial model built from the
same seed. Each round runs one step of every side in turn (the others wait at a barrier, off the
CPU), so machine load hits all sides alike; the figure is the median over rounds. "comm" is the share of a
TP=2 step spent inside tensor-parallel collectives (waiting for the peer included), timed by
wrapping the collectives that ``megallama.parallel`` calls. Losses of all sides must agree.

    python bench/tensor_parallel.py              # the foundation benchmark's config
    python bench/tensor_parallel.py --steps 4    # quicker
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing

from benchlib import add_json_flag, ratio_row, write_json
from megallama import parallel
from megallama.config import LlamaConfig
from megallama.model import LlamaModel
from megallama.parallel import mappings

# bench/train_step.py's model (the foundation benchmark).
CONFIG = dict(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=688,
              vocab_size=8000, max_position_embeddings=256)
TARGET = 0.7  # TP=2 tokens/s over TP=1 with 2 threads, the goal
SIDES = ["TP=1 x1 thread", "TP=1 x2 threads", "TP=2 SP=off", "TP=2 SP=on"]


class CommTimer:
    """Wall time spent inside the collectives that megallama.parallel issues."""

    def __init__(self):
        self.seconds = 0.0
        for module, name in ((mappings, "_all_gather_flat"), (mappings, "_reduce_scatter_flat"),
                             (mappings.dist, "all_reduce"), (mappings, "_wait")):
            # mappings.dist is torch.distributed itself: the loss's all-reduces are timed too.
            # The layers start collectives asynchronously: their time is the launch plus the wait.
            setattr(module, name, self._timed(getattr(module, name)))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return wrapper


def make_step(model):
    def step(ids, labels):
        loss = model(ids, labels=labels)
        loss.mean().backward()
        model.zero_grad(set_to_none=True)
        return loss.detach().sum().item()
    return step


def worker(index, workdir, barrier, args):
    """Processes 0 and 1 are the TP=2 ranks; process 2 runs the serial model (model-parallel state
    is per process, so a serial model cannot share a process with TP=2 ones)."""
    torch.set_num_threads(1)
    config = LlamaConfig(**CONFIG)
    g = torch.Generator().manual_seed(1234)
    data = [(torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g),
             torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g))
            for _ in range(args.warmup + args.steps)]
    sides = {}
    if index == 2:
        torch.manual_seed(0)
        serial = make_step(LlamaModel(config))
        sides = {SIDES[0]: (serial, 1), SIDES[1]: (serial, 2)}
    else:
        dist.init_process_group("gloo", init_method="file://" + os.path.join(workdir, "store"), rank=index,
                                world_size=2, timeout=datetime.timedelta(seconds=600))
        parallel.initialize_model_parallel(2)
        for name, sp in ((SIDES[2], False), (SIDES[3], True)):
            torch.manual_seed(0)
            sides[name] = (make_step(LlamaModel(dataclasses.replace(config, sequence_parallel=sp))), 1)
    timer = CommTimer()
    record = {name: {"times": [], "comm": [], "losses": []} for name in sides}
    for i, (ids, labels) in enumerate(data):
        for name in SIDES:
            barrier.wait()  # the processes not running this side wait here, off the CPU
            if name not in sides:
                continue
            step, threads = sides[name]
            torch.set_num_threads(threads)
            timer.seconds = 0.0
            t0 = time.perf_counter()
            record[name]["losses"].append(step(ids, labels))
            elapsed = time.perf_counter() - t0
            torch.set_num_threads(1)
            if i >= args.warmup:
                record[name]["times"].append(elapsed)
                record[name]["comm"].append(timer.seconds / elapsed)
    barrier.wait()
    if index != 1:
        with open(os.path.join(workdir, f"record_{index}.json"), "w") as f:
            json.dump(record, f)
    if index != 2:
        parallel.destroy_model_parallel()
        dist.destroy_process_group()


def report(args, times, comm, losses):
    tokens = args.batch * args.seq
    result = {"config": CONFIG, "batch": args.batch, "seq": args.seq, "steps": args.steps, "sides": {}}
    print(f"forward+backward, CPU fp32, batch {args.batch} x seq {args.seq}, median of {args.steps} rounds")
    print(f"{'':18}{'ms/step':>10}{'tokens/s':>10}{'comm':>8}")
    for name, t in times.items():
        median = statistics.median(t)
        share = statistics.median(comm[name]) if name.startswith("TP=2") else 0.0
        result["sides"][name] = {"step_ms": median * 1e3, "tokens_per_s": tokens / median, "comm_share": share}
        print(f"{name:18}{median * 1e3:10.1f}{tokens / median:10.0f}{share:8.1%}")
    per_s = {name: r["tokens_per_s"] for name, r in result["sides"].items()}
    for sp in ("off", "on"):
        tp2 = per_s[f"TP=2 SP={sp}"]
        result[f"ratio_tp2_sp_{sp}_vs_tp1_2threads"] = tp2 / per_s["TP=1 x2 threads"]
        result[f"ratio_tp2_sp_{sp}_vs_tp1_1thread"] = tp2 / per_s["TP=1 x1 thread"]
        print(f"TP=2 SP={sp}: {tp2 / per_s['TP=1 x2 threads']:.2f}x TP=1 x2 threads "
              f"(target >= {TARGET}), {tp2 / per_s['TP=1 x1 thread']:.2f}x TP=1 x1 thread")
    # Same weights and batches on every side: the losses must agree, or the comparison means nothing.
    reference = losses["TP=1 x1 thread"]
    drift = max(abs(a - b) / abs(b) for name in losses for a, b in zip(losses[name], reference))
    result["max_relative_loss_difference"] = drift
    print(f"max relative loss difference between sides {drift:.1e}")
    write_json(args.json, [
        ratio_row(f"TP=2 fwd+bwd (2 procs × 1 thread), SP {sp}", "tokens/s", "TP=1, 1 proc × 2 threads",
                  result[f"ratio_tp2_sp_{sp}_vs_tp1_2threads"], f"≥ {TARGET}×") for sp in ("off", "on")], result)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed rounds (one step of every side each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--batch", type=int, default=4, help="micro-batch size")
    p.add_argument("--seq", type=int, default=256, help="sequence length")
    add_json_flag(p)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="megallama_bench_tp_") as workdir:
        barrier = torch.multiprocessing.get_context("spawn").Barrier(3)
        torch.multiprocessing.spawn(worker, args=(workdir, barrier, args), nprocs=3)
        record = {}
        for index in (0, 2):
            with open(os.path.join(workdir, f"record_{index}.json")) as f:
                record.update(json.load(f))
    report(args, {n: record[n]["times"] for n in SIDES}, {n: record[n]["comm"] for n in SIDES},
           {n: record[n]["losses"] for n in SIDES})


if __name__ == "__main__":
    main()
