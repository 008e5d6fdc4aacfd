"""ZeRO-1 training steps at DP=2 with the parameter all-gathers (and gradient reduce-scatters)
overlapped against the same steps with them synchronous, CPU fp32, gloo.

Two processes (the DP ranks, 1 thread each) each hold three sides, built from the same seed: the
"sync" side's DDP has neither ``overlap_grad_reduce`` nor ``overlap_param_gather``, the "grad"
side only the first (the DDP's default), the "both" side both. Each round runs ``--block``
consecutive training steps (forward + backward + distributed AdamW) of every side in turn, so
machine load hits all alike; the first step of a block is not timed (the overlapped gathers it
inherits completed during the other sides' blocks), and figures are medians over the timed steps.
"exposed all-gather" is the time a rank spends starting and waiting for the parameter all-gathers:
without the overlap the synchronous collectives inside the optimizer step, with it their start
there and the waits in the forward pre-hooks (the gathers write into the parameters themselves, so
nothing is copied after them). "exposed reduce" is the time spent in ``finish_grad_sync``. All
sides must end with bit-identical losses.

Only the embedding's gather is needed at once: the layers' are waited for as each layer starts and
the output layer's at the final norm, so they hide behind the forward (in this small model the
embedding and output layer are 56% of the parameters; in LLaMA-7B, 4%).

    python bench/zero_overlap.py              # the foundation benchmark's model
    python bench/zero_overlap.py --rounds 2   # quicker
"""
from __future__ import annotations

import argparse
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
from megallama.distributed import (DistributedDataParallel, OptimizerConfig, build_optimizer,
                                   finalize_model_grads)
from megallama.model import LlamaModel

# bench/train_step.py's model (the foundation benchmark).
CONFIG = dict(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=688,
              vocab_size=8000, max_position_embeddings=256)
SIDES = {"sync": (False, False), "grad": (True, False), "both": (True, True)}  # (grad reduce, param gather)


class WaitTimer:
    """Wall time spent in a DDP chunk's ``methods`` (wrapped on the instance, which its hooks and
    the optimizer call); a call inside another of them counts once."""

    def __init__(self, chunk: DistributedDataParallel, *methods: str):
        self.seconds = 0.0
        self._depth = 0
        for method in methods:
            self._wrap(chunk, method)

    def _wrap(self, chunk, method):
        original = getattr(chunk, method)

        def timed(*args):
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return original(*args)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - t0
        setattr(chunk, method, timed)


def build_side(config: LlamaConfig, overlap: tuple, bucket_size: int):
    torch.manual_seed(0)
    overlap_grad_reduce, overlap_param_gather = overlap
    chunk = DistributedDataParallel(LlamaModel(config), use_distributed_optimizer=True, bucket_size=bucket_size,
                                    overlap_grad_reduce=overlap_grad_reduce,
                                    overlap_param_gather=overlap_param_gather)
    optimizer = build_optimizer(OptimizerConfig(use_distributed_optimizer=True, overlap_grad_reduce=overlap_grad_reduce,
                                                overlap_param_gather=overlap_param_gather), [chunk])
    gather = WaitTimer(chunk, "start_param_gather", "wait_param_gather")
    reduce = WaitTimer(chunk, "finish_grad_sync")

    def step(ids, labels):
        optimizer.zero_grad()
        per_token = chunk(ids, labels=labels)
        loss_sum = per_token.sum()
        loss_sum.backward()
        finalize_model_grads([chunk], [{"loss_sum": loss_sum.detach(), "num_tokens": per_token.numel()}])
        optimizer.step()
        return loss_sum.item()
    return step, gather, reduce, len(chunk.buckets)


def worker(rank, workdir, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(workdir, "store"), rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=600))
    parallel.initialize_model_parallel(1, 1)
    config = LlamaConfig(**CONFIG)
    g = torch.Generator().manual_seed(1234 + rank)  # each DP rank its own micro-batch
    rounds = [[(torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g),
                torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g))
               for _ in range(args.block)] for _ in range(args.warmup + args.rounds)]
    sides = {name: build_side(config, overlap, args.bucket_size) for name, overlap in SIDES.items()}
    record = {name: {"times": [], "gather": [], "reduce": [], "losses": [], "buckets": sides[name][3]}
              for name in sides}
    for i, block in enumerate(rounds):
        for name, (step, gather, reduce, _) in sides.items():
            # Both ranks start the block together. Not between its steps: a gloo barrier also
            # waits for the all-gathers in flight, which would take them out of the timed step.
            dist.barrier()
            for j, (ids, labels) in enumerate(block):
                gather.seconds = reduce.seconds = 0.0
                t0 = time.perf_counter()
                record[name]["losses"].append(step(ids, labels))
                elapsed = time.perf_counter() - t0
                if i >= args.warmup and j > 0:
                    record[name]["times"].append(elapsed)
                    record[name]["gather"].append(gather.seconds)
                    record[name]["reduce"].append(reduce.seconds)
    if rank == 0:
        with open(os.path.join(workdir, "record.json"), "w") as f:
            json.dump(record, f)
    parallel.destroy_model_parallel()
    dist.destroy_process_group()


def report(args, record):
    tokens = 2 * args.batch * args.seq
    result = {"config": CONFIG, "batch_per_rank": args.batch, "seq": args.seq, "rounds": args.rounds,
              "block": args.block, "bucket_size": args.bucket_size, "buckets": record["sync"]["buckets"],
              "sides": {}}
    print(f"ZeRO-1 train step at DP=2 (gloo, 2 procs x 1 thread), CPU fp32, batch {args.batch} x seq {args.seq} "
          f"per rank, {result['buckets']} buckets, median of {len(record['sync']['times'])} steps (rank 0)")
    print(f"{'':6}{'ms/step':>10}{'tokens/s':>10}{'exposed all-gather ms':>23}{'exposed reduce ms':>19}")
    for name, r in record.items():
        step = statistics.median(r["times"])
        result["sides"][name] = {"step_ms": step * 1e3, "tokens_per_s": tokens / step,
                                 "exposed_gather_ms": statistics.median(r["gather"]) * 1e3,
                                 "exposed_reduce_ms": statistics.median(r["reduce"]) * 1e3,
                                 "step_ms_all": [t * 1e3 for t in r["times"]]}
        s = result["sides"][name]
        print(f"{name:6}{s['step_ms']:10.1f}{s['tokens_per_s']:10.0f}{s['exposed_gather_ms']:23.2f}"
              f"{s['exposed_reduce_ms']:19.2f}")
    sides = result["sides"]
    for name, peer in (("both", "sync"), ("both", "grad")):
        speedup = sides[name]["tokens_per_s"] / sides[peer]["tokens_per_s"]
        gather = sides[name]["exposed_gather_ms"] / sides[peer]["exposed_gather_ms"]
        result[f"{name}_vs_{peer}"] = {"speedup": speedup, "exposed_gather_ratio": gather}
        print(f"{name} / {peer}: tokens/s {speedup:.2f}x, exposed all-gather {gather:.2f}x")
    # Same weights and batches on every side: the overlaps change only when collectives are waited for.
    result["losses_identical"] = all(r["losses"] == record["sync"]["losses"] for r in record.values())
    print(f"losses identical: {result['losses_identical']}")
    if not result["losses_identical"]:
        raise SystemExit("an overlapped side's losses differ from the synchronous side's")
    benchmark = "ZeRO-1 train step, DP=2 gloo, overlap param gather + grad reduce"
    write_json(args.json, [
        ratio_row(benchmark, "tokens/s", "both synchronous", result["both_vs_sync"]["speedup"], "≥ 1.0×"),
        ratio_row(benchmark, "tokens/s", "grad reduce overlapped only", result["both_vs_grad"]["speedup"], "≥ 1.0×"),
        ratio_row(benchmark, "exposed all-gather time", "grad reduce overlapped only",
                  result["both_vs_grad"]["exposed_gather_ratio"], "< 1.0×"),
    ], result)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (one block of steps of every side each)")
    p.add_argument("--block", type=int, default=3, help="consecutive steps of a side per round (the first untimed)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--batch", type=int, default=2, help="micro-batch size per DP rank")
    p.add_argument("--seq", type=int, default=128, help="sequence length")
    # About a third of a layer (10 buckets), as Megatron's 40M-element buckets are of a 7B model's layer.
    p.add_argument("--bucket-size", type=int, default=250_000, help="gradient bucket size (elements)")
    add_json_flag(p)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="megallama_bench_zero_") as workdir:
        torch.multiprocessing.spawn(worker, args=(workdir, args), nprocs=2)
        with open(os.path.join(workdir, "record.json")) as f:
            record = json.load(f)
    report(args, record)


if __name__ == "__main__":
    main()
