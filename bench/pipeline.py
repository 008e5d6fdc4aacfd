"""Measured pipeline bubble of 1F1B and interleaved 1F1B at PP=2 on CPU, against the theory.

The interleaved schedule is measured twice: "interleaved" with synchronous exchanges
(``overlap_p2p_comm=False``, one exchange per step waited at once) and "interleaved+overlap" with
Megatron's overlapped ones (the default: posted after the compute producing them, waited before
the compute needing them).

Two gloo processes (one thread each) run a LLaMA split into two stages. On every rank the time spent
in point-to-point exchanges (posting and waiting) is the bubble (idle) time; the bubble fraction is
idle / total schedule time, averaged over ranks and iterations. Part of that wait is the transfer
itself (latency, copies), not the schedule: a ping-pong of the same activation measures the cost of
one exchange, and "net" subtracts (exchanges × that cost). Theory (Narayanan et al. 2021): 1F1B
idles (p − 1) micro-batch slots out of m + p − 1, i.e. (p − 1)/(m + p − 1); interleaving with v
chunks per rank divides the idle slots by v: ((p − 1)/v)/(m + (p − 1)/v). Overlap moves the same
tensors as the synchronous schedule in more, smaller exchanges, so its "net" subtracts the
synchronous run's exchanges × cost; a transfer hidden behind compute is in no wait, so there "net"
may still over-subtract: compare iteration times too. The three sides are alternated iteration by
iteration so machine load hits them alike.

    python bench/pipeline.py                       # m = 2, 4, 8 micro-batches, v = 2
    python bench/pipeline.py --microbatches 4 16 --num-layers 16 --virtual-size 4
"""
import argparse
import datetime
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchlib import add_json_flag, ratio_row, write_json

PP = 2
# (name, interleaved, overlap_p2p_comm); the first two names are the stored table's rows
SIDES = (("1F1B", False, True), ("interleaved", True, False), ("interleaved+overlap", True, True))
# Whose exchange count "net" charges: overlap splits the synchronous schedule's exchanges.
SAME_TRANSFERS = {"interleaved+overlap": "interleaved"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, default=8, help="transformer layers (divisible by 2 × virtual size)")
    p.add_argument("--hidden-size", type=int, default=256, help="model width")
    p.add_argument("--num-attention-heads", type=int, default=4, help="attention heads")
    p.add_argument("--seq-length", type=int, default=128, help="tokens per sequence")
    p.add_argument("--micro-batch-size", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8],
                   help="numbers of micro-batches m to measure (even, for the interleaved schedule)")
    p.add_argument("--virtual-size", type=int, default=2, help="model chunks per rank v for interleaving")
    p.add_argument("--iters", type=int, default=10, help="measured iterations per (m, schedule)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured iterations per (m, schedule) first")
    add_json_flag(p)
    return p.parse_args(argv)


def _timed_p2p(record):
    """Patch the communicator so record = [seconds spent posting and waiting, exchanges posted]."""
    from megallama.pipeline.p2p import PendingExchange, PipelineCommunicator

    def timed(original, counts):
        def method(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                record[0] += time.perf_counter() - start
                record[1] += counts
        return method

    PipelineCommunicator.post = timed(PipelineCommunicator.post, 1)
    PendingExchange.wait = timed(PendingExchange.wait, 0)


def _exchange_cost(shape, reps=20):
    """Seconds per exchange of one activation (an ActivationShape) between the two (idle) stages."""
    from megallama.parallel import state
    from megallama.pipeline.p2p import PipelineCommunicator

    comm = PipelineCommunicator(state.get_pipeline_model_parallel_group(), shape.tensor_shape(), shape.dtype,
                                torch.device("cpu"))
    x = torch.randn(shape.tensor_shape(), dtype=shape.dtype)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        comm.communicate(send_next=x, recv_prev=True)
    return (time.perf_counter() - start) / reps


def _build(cfg, vp):
    from megallama.model import LlamaModel
    from megallama.parallel import state
    from megallama.pipeline import build_model_chunks

    state.initialize_model_parallel(1, PP, vp)
    torch.manual_seed(0)
    return build_model_chunks(lambda s: LlamaModel(cfg, pre_process=s.pre_process,
                                                   post_process=s.post_process,
                                                   layer_ids=s.layer_ids), cfg, vp)


def _rank(rank, args, store):
    from megallama.config import LlamaConfig
    from megallama.parallel import state
    from megallama.pipeline import ActivationShape, get_forward_backward_func
    from megallama.training.forward_step import llama_forward_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=PP,
                            timeout=datetime.timedelta(seconds=300))
    cfg = LlamaConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                      num_attention_heads=args.num_attention_heads, vocab_size=512,
                      max_position_embeddings=args.seq_length)
    waited = [0.0, 0]
    _timed_p2p(waited)
    shape = ActivationShape(args.seq_length, args.micro_batch_size, cfg.hidden_size)
    g = torch.Generator().manual_seed(0)
    results = {}
    for m in args.microbatches:
        data = [(t[:, :-1], t[:, 1:]) for t in
                (torch.randint(0, cfg.vocab_size, (args.micro_batch_size, args.seq_length + 1), generator=g)
                 for _ in range(m))]
        # Each iteration builds every side's model and re-initialises the groups.
        for it in range(args.warmup + args.iters):
            exchanges = {}
            for name, interleaved, overlap in SIDES:
                vp = args.virtual_size if interleaved else None
                chunks = _build(cfg, vp)
                iters = [iter(data) for _ in chunks] if vp else iter(data)
                cost = _exchange_cost(shape)
                dist.barrier()
                waited[:] = [0.0, 0]
                start = time.perf_counter()
                get_forward_backward_func(PP, vp, overlap)(llama_forward_step, iters, chunks, m, shape)
                total = time.perf_counter() - start
                state.destroy_model_parallel()
                exchanges[name] = waited[1]
                transfers = exchanges[SAME_TRANSFERS.get(name, name)]
                if it >= args.warmup:
                    results.setdefault((m, name), []).append((waited[0], transfers * cost, total))
    gathered = [None] * PP
    dist.all_gather_object(gathered, results)
    if rank == 0:
        report(args, gathered)
    dist.destroy_process_group()


def report(args, per_rank):
    p, v = PP, args.virtual_size
    print(f"PP={p}, v={v}, {args.num_layers} layers, hidden {args.hidden_size}, seq {args.seq_length}, "
          f"micro-batch {args.micro_batch_size}; bubble = time in p2p (posting + waiting) / schedule time, "
          "net = without the measured transfer cost")
    print(f"{'m':>4} {'schedule':>20} {'bubble':>8} {'net':>8} {'theory':>8} {'time (s)':>9}")
    rows, details = [], {}
    for m in args.microbatches:
        times = {}
        for name, interleaved, _ in SIDES:
            samples = [s for r in per_rank for s in r[(m, name)]]
            bubble = sum(w / t for w, _, t in samples) / len(samples)
            net = sum(max(0.0, w - c) / t for w, c, t in samples) / len(samples)
            slots = (p - 1) / (v if interleaved else 1)
            theory = slots / (m + slots)
            times[name] = sum(t for _, _, t in samples) / len(samples)
            print(f"{m:>4} {name:>20} {bubble:>8.3f} {net:>8.3f} {theory:>8.3f} {times[name]:>9.3f}")
            details[f"m={m} {name}"] = {"bubble": bubble, "net_bubble": net, "theory": theory, "time_s": times[name]}
            if m == max(args.microbatches):
                theory_name = f"(p−1)/(m+p−1){'/v' if interleaved else ''}"
                rows.append(ratio_row(f"PP=2 {name} (v={v if interleaved else 1}), m={m}",
                                      "bubble fraction (net of transfers)", f"theory {theory_name} = {theory:.3f}",
                                      net / theory))
        for name, peer in (("interleaved", "1F1B"), ("interleaved+overlap", "1F1B"),
                           ("interleaved+overlap", "interleaved")):
            print(f"{m:>4} {'ratio':>20} {name} / {peer} time = {times[name] / times[peer]:.3f}")
            if m == max(args.microbatches):
                rows.append(ratio_row(f"PP=2 {name} vs {peer}, m={m}", "iteration time", peer,
                                      times[name] / times[peer]))
    write_json(args.json, rows, details)


def main(argv=None):
    args = parse_args(argv)
    if any(m % PP for m in args.microbatches):
        sys.exit(f"--microbatches must be multiples of {PP} (the interleaved schedule needs m % p == 0)")
    if args.num_layers % (PP * args.virtual_size):
        sys.exit(f"--num-layers ({args.num_layers}) must be divisible by {PP} × --virtual-size "
                 f"({args.virtual_size})")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(args, os.path.join(tmp, "store")), nprocs=PP)


if __name__ == "__main__":
    main()
