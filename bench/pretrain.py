"""Throughput and MFU of `megallama.pretrain --mock-data` runs, against a plain training loop.

Each megallama run is a real launch of the entry point (``torchrun -m megallama.pretrain``) and the
figures are read from its own log line: tokens/s, TFLOP/s per device and MFU, averaged over the
second half of the run (the first half warms up). The peer is the plainest loop that trains the
same network on the same tokens: ``transformers.LlamaForCausalLM`` + ``F.cross_entropy`` + torch's
fused AdamW, one process; the headline ratio is megallama's single-process tokens/s over the
peer's. Runs alternate (ours, peer, layouts, …) for ``--rounds`` rounds; medians are reported.

On CPU: fp32, layouts of 1 process × 2 threads (serial) and 2 processes × 1 thread (TP=2, PP=2,
DP=2); the peak for MFU is the sgemm FLOP/s measured here at the same thread count per process.
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
            "--num-attention-heads", str(m["num_attention_heads"]), "--ffn-hidden-size", str(m["ffn_hidden_size"]),
            "--vocab-size", str(m["vocab_size"]), "--seq-length", str(m["seq_length"]),
            "--micro-batch-size", str(m["micro_batch_size"]), "--global-batch-size", str(m["global_batch_size"]),
            "--train-iters", str(iters), "--log-interval", str(iters // 2), "--lr-warmup-iters", "1",
            "--mock-data", "--eval-iters", "0"]


def run_megallama(m: dict, iters: int, nproc: int, threads: int, peak: float | None, extra: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "megallama.pretrain",
               *model_flags(m, iters), *extra]
    if peak:
        command += ["--peak-tflops", f"{peak:.6g}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    tokens, tflops, mfu = LINE.findall(result.stdout)[-1]
    return {"tokens_per_s": float(tokens), "tflops": float(tflops),
            "mfu": float(mfu.rstrip("%")) / 100 if mfu.endswith("%") else None}


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


def run_peer(m: dict, iters: int, threads: int, bf16: bool, peak: float | None) -> dict:
    """The peer in a process of its own; TFLOP/s and MFU by the same count as megallama's log."""
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
    out["mfu"] = out["tflops"] / peak if peak else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds; medians are reported.")
    parser.add_argument("--iters", type=int, default=6, help="Iterations per run (the second half is timed).")
    parser.add_argument("--peer-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_worker:
        m, iters, bf16 = json.loads(args.peer_worker[0]), int(args.peer_worker[1]), bool(int(args.peer_worker[2]))
        print(json.dumps(peer_worker(m, iters, bf16)))
        return
    gpu = torch.cuda.is_available()
    m = GPU_MODEL if gpu else CPU_MODEL
    if gpu:
        from megallama.training.flops import detect_peak_tflops

        device_name = torch.cuda.get_device_name()
        peak = detect_peak_tflops(torch.bfloat16, torch.device("cuda"))
        runs = {"megallama 1 GPU bf16": (1, 1, peak, ["--bf16"])}
        peer = ("plain loop 1 GPU bf16 autocast", 1, True, peak)
    else:
        device_name = "CPU"
        peak1, peak2 = sgemm_tflops(1), sgemm_tflops(2)
        print(f"measured sgemm peak: {peak1:.4f} TFLOP/s at 1 thread, {peak2:.4f} at 2 threads")
        runs = {
            "megallama serial (1 proc × 2 threads)": (1, 2, peak2, []),
            "megallama TP=2 (2 procs × 1 thread)": (2, 1, peak1, ["--tensor-model-parallel-size", "2"]),
            "megallama PP=2 (2 procs × 1 thread)": (2, 1, peak1, ["--pipeline-model-parallel-size", "2"]),
            "megallama DP=2 (2 procs × 1 thread)": (2, 1, peak1, []),
        }
        peer = ("plain loop (1 proc × 2 threads)", 2, False, peak2)
    results: dict[str, list] = {name: [] for name in [*runs, peer[0]]}
    for r in range(args.rounds):
        for name, (nproc, threads, peak_tflops, extra) in runs.items():
            results[name].append(run_megallama(m, args.iters, nproc, threads, peak_tflops, extra))
            if name == next(iter(runs)):
                try:
                    results[peer[0]].append(run_peer(m, args.iters, *peer[1:]))
                except RuntimeError as error:  # e.g. transformers not installed on this machine
                    print(f"peer unavailable: {str(error)[-300:]}")
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    print(f"\n{device_name}; model {m}")
    print(f"{'run':42s} {'tokens/s':>10s} {'TFLOP/s/dev':>12s} {'MFU':>7s}")
    medians = {}
    for name, samples in results.items():
        if not samples:
            continue
        tokens = statistics.median(s["tokens_per_s"] for s in samples)
        medians[name] = tokens
        tflops = statistics.median(s["tflops"] for s in samples)
        mfus = [s["mfu"] for s in samples if s.get("mfu") is not None]
        print(f"{name:42s} {tokens:10.1f} {tflops:12.4g} "
              f"{(f'{100 * statistics.median(mfus):.1f}%') if mfus else 'n/a':>7s}")
    if peer[0] in medians:
        print(f"\nmegallama / plain loop tokens/s: {medians[next(iter(runs))] / medians[peer[0]]:.2f}×")


if __name__ == "__main__":
    main()
