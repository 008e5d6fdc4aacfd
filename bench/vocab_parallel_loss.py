"""The vocabulary-parallel cross-entropy (tensor-parallel ranks each holding a slice of the logits)
against megatron-core's ``vocab_parallel_cross_entropy``, forward + backward, TP=2 over gloo.

Two processes (the TP ranks, 1 thread each) get the same logits slices and targets (LLaMA's 32,000
words, 2,048 tokens, 8 of them ignored: megatron-core has no ignore index, so its side gets the
ignored rows' targets as 0 and its loss and gradient are compared on the other rows only). Each
round times one forward + backward of each side in turn, the two ranks starting together; medians
over rounds. megallama's side is two fused kernels around the all-reduces and keeps the unit
gradient in the logits' dtype; megatron-core's runs in fp32 with torch's elementwise ops.

    python bench/vocab_parallel_loss.py              # fp32 and bf16
    python bench/vocab_parallel_loss.py --rounds 3   # quicker
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

VOCAB, TOKENS, TP = 32000, 2048, 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def worker(rank, workdir, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(workdir, "store"), rank=rank,
                            world_size=TP, timeout=datetime.timedelta(seconds=600))
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_loss

    from megallama import parallel
    parallel.initialize_model_parallel(TP)
    parallel_state.initialize_model_parallel(TP, 1)
    g = torch.Generator().manual_seed(1234)
    logits = torch.randn(TOKENS, VOCAB, generator=g) * 3
    target = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    ignored = torch.arange(0, TOKENS, TOKENS // 8)
    target[ignored] = -100
    counted = target != -100
    local = logits.chunk(TP, -1)[rank].contiguous()
    upstream = torch.rand(TOKENS, generator=g)

    def ours(x):
        return parallel.vocab_parallel_cross_entropy(x, target)

    def megatron(x):  # [s, b, V/TP] and no ignore index: ignored rows take target 0
        return megatron_loss(x.unsqueeze(1), target.clamp(min=0).unsqueeze(1)).squeeze(1)

    record = {}
    for dname in args.dtypes:
        sides = {"megallama": ours, "megatron-core": megatron}
        times = {name: [] for name in sides}
        results = {}
        for r in range(args.warmup + args.rounds):
            for name, loss_fn in sides.items():
                x = local.to(DTYPES[dname], copy=True).requires_grad_()
                dist.barrier()
                t0 = time.perf_counter()
                loss = loss_fn(x)
                loss.backward(upstream * counted)
                elapsed = time.perf_counter() - t0
                if r >= args.warmup:
                    times[name].append(elapsed)
                results[name] = (loss.detach().float()[counted], x.grad.float()[counted])
        (ours_loss, ours_grad), (peer_loss, peer_grad) = results["megallama"], results["megatron-core"]
        tol = dict(rtol=1e-5, atol=1e-5) if dname == "float32" else dict(rtol=2e-2, atol=2e-2)
        record[dname] = {"times": times, "loss_max_diff": float((ours_loss - peer_loss).abs().max()),
                         "grad_max_diff": float((ours_grad - peer_grad).abs().max()),
                         "agree": torch.allclose(ours_loss, peer_loss, **tol)
                         and torch.allclose(ours_grad, peer_grad, **tol)}
    if rank == 0:
        with open(os.path.join(workdir, "record.json"), "w") as f:
            json.dump(record, f)
    parallel.destroy_model_parallel()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (one forward + backward of every side each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=list(DTYPES), help="logits dtypes")
    add_json_flag(p)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="megallama_bench_vocab_loss_") as workdir:
        torch.multiprocessing.spawn(worker, args=(workdir, args), nprocs=TP)
        with open(os.path.join(workdir, "record.json")) as f:
            record = json.load(f)
    print(f"vocabulary-parallel cross-entropy fwd+bwd, TP={TP} (gloo, {TP} procs x 1 thread), {TOKENS} tokens, "
          f"vocabulary {VOCAB} ({VOCAB // TP} a rank), median of {args.rounds} (rank 0)")
    rows = []
    for dname, r in record.items():
        ours, peer = (statistics.median(r["times"][name]) for name in ("megallama", "megatron-core"))
        print(f"{dname:9s} megallama {ours * 1e3:7.1f} ms  megatron-core {peer * 1e3:7.1f} ms  "
              f"speed-up {peer / ours:.2f}x  (max |diff| loss {r['loss_max_diff']:.1e}, grad {r['grad_max_diff']:.1e})")
        if not r["agree"]:
            raise SystemExit(f"{dname}: megallama's loss or gradient differs from megatron-core's")
        rows.append(ratio_row(f"vocab-parallel cross-entropy fwd+bwd, TP=2, V={VOCAB}, {TOKENS} tokens, CPU {dname}",
                              "speed", "megatron-core vocab_parallel_cross_entropy", peer / ours, "≥ 1.0×"))
    write_json(args.json, rows, {"tokens": TOKENS, "vocab": VOCAB, "tp": TP, "rounds": args.rounds, "sides": record})


if __name__ == "__main__":
    main()
