"""Throughput and MFU of `megallama.pretrain --mock-data` runs, against a plain training loop.

Each megallama run is a real launch of the entry point (``torchrun -m megallama.pretrain``) and the
figures are read from its own log line: tokens/s and TFLOP/s per device, averaged over the second
half of the run (the first half warms up); MFU is TFLOP/s per device over the peak below. The peer is the plainest loop that trains the
same network on the same tokens: ``transformers.LlamaForCausalLM`` + ``F.cross_entropy`` + torch's
fused AdamW, one process; the headline ratio is megallama's single-process tokens/s over the
peer's. Runs alternate (ours, peer, layouts, …) for ``--rounds`` rounds; medians are reported.

On CPU: fp32, layouts of 1 process × 2 threads (serial) and 2 processes × 1 thread (TP=2, PP=2,
DP=2); the peak is the best sgemm FLOP/s measured (each round) at the same threads per process.
On one GPU (unchanged command): bf16, the serial layout of a larger model, the peer under bf16
autocast; the peak is the GPU's datasheet bf16 figure.

    python bench/pretrain.py              # CPU here, or the GPU when there is one
    python bench/pretrain.py --rounds 1   # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

import torch

from benchlib import add_json_flag, ratio_row, write_json

CPU_MODEL = dict(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=688, vocab_size=8000,
                 seq_length=256, micro_batch_size=2, global_batch_size=8)
GPU_MODEL = dict(num_layers=16, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=5632, vocab_size=32000,
                 seq_length=2048, micro_batch_size=4, global_batch_size=16)
LINE = re.compile(r"tokens/s (\S+) \| TFLOP/s per device (\S+) \| MFU (\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sgemm_tflops(threads: int, n: int = 1024, repeats: int = 10) -> float:
    """Measured fp32 matmul TFLOP/s with ``threads`` threads (the CPU's practical peak)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    seconds = time.perf_counter() - start
    torch.set_num_threads(before)
    return 2 * n ** 3 * repeats / seconds / 1e12


def model_flags(m: dict, iters: int) -> list[str]:
    return ["--num-layers", str(m["num_layers"]), "--hidden-size", str(m["hidden_size"]),
            "--untie-embeddings-and-output-weights",
            "--num-attention-heads", str(m["num_attention_heads"]), "--ffn-hidden-size", str(m["ffn_hidden_size"]),
            "--vocab-size", str(m["vocab_size"]), "--seq-length", str(m["seq_length"]),
            "--micro-batch-size", str(m["micro_batch_size"]), "--global-batch-size", str(m["global_batch_size"]),
            "--train-iters", str(iters), "--log-interval", str(iters // 2), "--lr-warmup-iters", "1",
            "--mock-data", "--eval-iters", "0"]


def run_megallama(m: dict, iters: int, nproc: int, threads: int, extra: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "megallama.pretrain",
               *model_flags(m, iters), *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    tokens, tflops, _ = LINE.findall(result.stdout)[-1]
    return {"tokens_per_s": float(tokens), "tflops": float(tflops)}


def peer_worker(m: dict, iters: int, bf16: bool) -> dict:
    """The plain loop, in this process: HF LlamaForCausalLM, cross-entropy, fused AdamW."""
    import torch.nn.functional as F
    import transformers

    from megallama.data.gpt_dataset import MockGPTDataset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = transformers.LlamaConfig(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["ffn_hidden_size"],
        num_hidden_layers=m["num_layers"], num_attention_heads=m["num_attention_heads"],
        max_position_embeddings=m["seq_length"], tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float().to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), fused=True)
    data = MockGPTDataset(m["seq_length"], m["vocab_size"], iters * m["global_batch_size"], seed=1234)
    micro, accumulation = m["micro_batch_size"], m["global_batch_size"] // m["micro_batch_size"]
    seconds = []
    for it in range(iters):
        start = time.perf_counter()
        for k in range(accumulation):
            first = (it * accumulation + k) * micro
            samples = [data[i] for i in range(first, first + micro)]
            ids = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).to(device)
            labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1)) / accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    per_iteration = statistics.mean(seconds[iters // 2:])
    return {"tokens_per_s": m["global_batch_size"] * m["seq_length"] / per_iteration}


def run_peer(m: dict, iters: int, threads: int, bf16: bool) -> dict:
    """The peer in a process of its own; TFLOP/s by the same count as megallama's log."""
    from megallama.training.flops import estimate_flops

    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, __file__, "--peer-worker", json.dumps(m), str(iters), str(int(bf16))],
                            env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"peer failed:\n{result.stderr[-3000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    flops_per_token = estimate_flops(num_layers=m["num_layers"], hidden_size=m["hidden_size"],
                                     ffn_hidden_size=m["ffn_hidden_size"], seq_length=m["seq_length"],
                                     vocab_size=m["vocab_size"]) / m["seq_length"]
    out["tflops"] = out["tokens_per_s"] * flops_per_token / 1e12
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds; medians are reported.")
    parser.add_argument("--iters", type=int, default=6, help="Iterations per run (the second half is timed).")
    parser.add_argument("--peer-worker", nargs=3, help=argparse.SUPPRESS)
    add_json_flag(parser)
    args = parser.parse_args()
    if args.peer_worker:
        m, iters, bf16 = json.loads(args.peer_worker[0]), int(args.peer_worker[1]), bool(int(args.peer_worker[2]))
        print(json.dumps(peer_worker(m, iters, bf16)))
        return
    gpu = torch.cuda.is_available()
    m = GPU_MODEL if gpu else CPU_MODEL
    # name: (processes, threads per process, extra flags); the first is the peer's counterpart.
    if gpu:
        from megallama.training.flops import detect_peak_tflops

        device_name = torch.cuda.get_device_name()
        datasheet = detect_peak_tflops(torch.bfloat16, torch.device("cuda"))
        runs = {"megallama 1 GPU bf16": (1, 1, ["--bf16"])}
        peer = ("plain loop 1 GPU bf16 autocast", 1, True)
    else:
        device_name = "CPU"
        runs = {
            "megallama serial (1 proc × 2 threads)": (1, 2, []),
            "megallama TP=2 (2 procs × 1 thread)": (2, 1, ["--tensor-model-parallel-size", "2"]),
            "megallama PP=2 (2 procs × 1 thread)": (2, 1, ["--pipeline-model-parallel-size", "2"]),
            "megallama DP=2 (2 procs × 1 thread)": (2, 1, []),
        }
        peer = ("plain loop (1 proc × 2 threads)", 2, False)
    sgemm: dict[int, list] = {1: [], 2: []}
    results: dict[str, list] = {name: [] for name in [*runs, peer[0]]}
    for r in range(args.rounds):
        if not gpu:  # the CPU's peak, re-measured each round: the best seen is the capacity
            for threads in sgemm:
                sgemm[threads].append(sgemm_tflops(threads))
        for name, (nproc, threads, extra) in runs.items():
            results[name].append(run_megallama(m, args.iters, nproc, threads, extra))
            if name == next(iter(runs)):
                try:
                    results[peer[0]].append(run_peer(m, args.iters, peer[1], peer[2]))
                except RuntimeError as error:  # e.g. transformers not installed on this machine
                    print(f"peer unavailable: {str(error)[-300:]}")
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    threads_of = {name: spec[1] for name, spec in runs.items()}
    threads_of[peer[0]] = peer[1]
    if gpu:
        peak = {name: datasheet for name in results}
        print(f"\n{device_name} (datasheet bf16 peak {datasheet} TFLOP/s); model {m}")
    else:
        peak = {name: max(sgemm[threads_of[name]]) for name in results}
        print(f"\nCPU, best measured sgemm {max(sgemm[1]):.4g} TFLOP/s at 1 thread, {max(sgemm[2]):.4g} at 2 "
              f"threads (the MFU peak per process); model {m}")
    print(f"{'run':42s} {'tokens/s':>10s} {'TFLOP/s/dev':>12s} {'MFU':>7s}")
    medians, details = {}, {"device": device_name, "model": m}
    for name, samples in results.items():
        if not samples:
            continue
        medians[name] = statistics.median(s["tokens_per_s"] for s in samples)
        tflops = statistics.median(s["tflops"] for s in samples)
        mfu = tflops / peak[name] if peak[name] else None
        details[name] = {"tokens_per_s": medians[name], "tflops": tflops, "mfu": mfu}
        print(f"{name:42s} {medians[name]:10.1f} {tflops:12.4g} {f'{100 * mfu:.1f}%' if mfu else 'n/a':>7s}")
    rows = []
    if peer[0] in medians:
        ratio = medians[next(iter(runs))] / medians[peer[0]]
        print(f"\nmegallama / plain loop tokens/s: {ratio:.2f}×")
        label = f"pretrain --mock-data, {'1 GPU bf16' if gpu else 'CPU fp32 serial'}"
        rows.append(ratio_row(label, "tokens/s", "HF model + plain loop", ratio))
    write_json(args.json, rows, details)


if __name__ == "__main__":
    main()
