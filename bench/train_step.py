"""One training step (forward + backward + AdamW) of megallama against HF transformers, CPU fp32.

Both sides get the same weights and batches: ours is ``LlamaModel(ids, labels=...)`` (its own fused
loss) + ``torch.optim.AdamW(fused=True)``; the peer is ``transformers.LlamaForCausalLM`` +
``F.cross_entropy`` + ``torch.optim.AdamW`` (its default implementation). Steps alternate between
the two in one process, so machine load hits both alike. Peak memory is measured for each side in
a process of its own (the kernel's RSS high-water mark during the steps minus RSS before the model
is built; Linux). "MFU" is each side's model FLOP/s (PaLM count) over the sgemm FLOP/s measured
here at the model's shapes. The same model with grouped-query attention (one K/V head for its four
query heads) is timed as a second case against HF with the same config (tokens/s only).

    python bench/train_step.py            # the issue's config, prints the table
    python bench/train_step.py --steps 5  # quicker
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchlib import add_json_flag, peak_rss_of, print_peak_rss, ratio_row, start_peak_rss, write_json
from megallama.config import LlamaConfig
from megallama.model import LlamaModel, get_param_groups
from megallama.training.flops import estimate_flops

CONFIG = dict(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=688,
              vocab_size=8000, max_position_embeddings=256)
GQA_CONFIG = dict(CONFIG, num_query_groups=CONFIG["num_attention_heads"] // 4)
LR, BETAS, WD = 3e-4, (0.9, 0.95), 0.1


def build(side: str, config: LlamaConfig, seed: int = 0, same_weights: bool = True):
    """(step function, model) for one side, weights drawn from ``seed``; ``same_weights=False``
    lets ours skip building the HF model it copies its weights from (for memory figures)."""
    import transformers

    torch.manual_seed(seed)
    if side == "ours" and not same_weights:
        hf = None
    else:
        hf_cfg = config.to_hf()
        hf_cfg._attn_implementation = "sdpa"
        hf = transformers.LlamaForCausalLM(hf_cfg).float()
    if side == "hf":
        opt = torch.optim.AdamW(hf.parameters(), lr=LR, betas=BETAS, weight_decay=WD)

        def step(ids, labels):
            logits = hf(input_ids=ids).logits
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
        return step, hf
    model = LlamaModel(config)
    if hf is not None:
        model.load_hf_state_dict(hf.state_dict())
        del hf
    opt = torch.optim.AdamW(get_param_groups(model, WD), lr=LR, betas=BETAS, fused=True)

    def step(ids, labels):
        loss = model(ids, labels=labels).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step, model


def batches(config: LlamaConfig, batch: int, seq: int, n: int):
    g = torch.Generator().manual_seed(1234)
    return [(torch.randint(0, config.vocab_size, (batch, seq), generator=g),
             torch.randint(0, config.vocab_size, (batch, seq), generator=g)) for _ in range(n)]


def sgemm_flops(tokens: int, config: LlamaConfig, reps: int = 10, passes: int = 5) -> float:
    """FLOP/s of torch.mm at the model's projection shapes (the machine's matmul ceiling here):
    the best of ``passes`` passes, since a pass the machine disturbed only measures the machine."""
    h, f = config.hidden_size, config.ffn_hidden_size
    shapes = [(tokens, h, 3 * h), (tokens, h, 2 * f), (tokens, f, h), (tokens, h, config.vocab_size)]
    mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    flops = sum(2.0 * m * k * n * reps for m, k, n in shapes)
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for a, b in mats:
            for _ in range(reps):
                torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return flops / best


def timed_steps(config: LlamaConfig, args) -> tuple[dict, dict]:
    """Per side, the timed steps' seconds and every step's loss, the sides alternating step by step."""
    sides = {name: build(name, config)[0] for name in ("ours", "hf")}
    data = batches(config, args.batch, args.seq, args.warmup + args.steps)
    times = {name: [] for name in sides}
    losses = {name: [] for name in sides}
    for i, (ids, labels) in enumerate(data):
        for name, step in sides.items():
            t0 = time.perf_counter()
            losses[name].append(step(ids, labels))
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    return times, losses


def max_loss_difference(losses: dict) -> float:
    """Same weights and batches: the two loss curves must agree, or the comparison means nothing."""
    return max(abs(a - b) for a, b in zip(losses["ours"], losses["hf"]))


def peak_memory_child(side: str, batch: int, seq: int, steps: int) -> None:
    import transformers

    config = LlamaConfig(**CONFIG)
    data = batches(config, batch, seq, steps)
    # Load the code both sides use before the baseline, so the figure is the step's own memory:
    # the transformers model module, and torch.optim's lazily imported machinery (~70 MiB).
    assert transformers.LlamaForCausalLM is not None
    for fused in (False, True):
        warm = torch.nn.Parameter(torch.zeros(8))
        warm.grad = torch.zeros(8)
        torch.optim.AdamW([warm], fused=fused).step()
    base = start_peak_rss()
    step, _ = build(side, config, same_weights=False)
    for ids, labels in data:
        step(ids, labels)
    print_peak_rss(base)


def peak_memory(side: str, args, runs: int = 3) -> float:
    """Median of ``runs`` fresh children: one child's peak RSS moves by up to 10% run to run (allocator)."""
    return statistics.median(peak_rss_of(__file__, ["--memory-child", side, "--batch", str(args.batch),
                                                    "--seq", str(args.seq), "--threads", str(args.threads)])
                             for _ in range(runs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per side (alternated)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--batch", type=int, default=4, help="micro-batch size")
    p.add_argument("--seq", type=int, default=256, help="sequence length")
    p.add_argument("--threads", type=int, default=2, help="torch threads (both sides)")
    add_json_flag(p)
    p.add_argument("--memory-child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        peak_memory_child(args.memory_child, args.batch, args.seq, 3)
        return

    config = LlamaConfig(**CONFIG)
    tokens = args.batch * args.seq
    times, losses = timed_steps(config, args)
    gqa_times, gqa_losses = timed_steps(LlamaConfig(**GQA_CONFIG), args)
    sgemm = sgemm_flops(tokens, config)
    flops_per_step = estimate_flops(num_layers=config.num_layers, hidden_size=config.hidden_size,
                                    ffn_hidden_size=config.ffn_hidden_size, seq_length=args.seq,
                                    vocab_size=config.vocab_size, num_sequences=args.batch)
    result = {"config": CONFIG, "batch": args.batch, "seq": args.seq, "threads": args.threads,
              "sgemm_gflops": sgemm / 1e9}
    for name in ("ours", "hf"):
        t = statistics.median(times[name])
        result[name] = {"step_ms": t * 1e3, "tokens_per_s": tokens / t,
                        "mfu_vs_sgemm": flops_per_step / t / sgemm, "peak_mib": peak_memory(name, args),
                        "final_loss": losses[name][-1]}
    result["speedup"] = result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    result["memory_ratio"] = result["ours"]["peak_mib"] / result["hf"]["peak_mib"]
    drift = result["max_loss_difference"] = max_loss_difference(losses)
    gqa = {name: {"step_ms": statistics.median(gqa_times[name]) * 1e3} for name in ("ours", "hf")}
    result["gqa"] = {"config": GQA_CONFIG, **gqa, "speedup": gqa["hf"]["step_ms"] / gqa["ours"]["step_ms"],
                     "max_loss_difference": max_loss_difference(gqa_losses)}
    print(f"train step, CPU fp32, {args.threads} threads, batch {args.batch} x seq {args.seq}, "
          f"sgemm {sgemm / 1e9:.0f} GFLOP/s")
    print(f"{'':8}{'ms/step':>10}{'tokens/s':>11}{'MFU(sgemm)':>12}{'peak MiB':>10}")
    for name in ("ours", "hf"):
        r = result[name]
        print(f"{name:8}{r['step_ms']:10.1f}{r['tokens_per_s']:11.0f}{r['mfu_vs_sgemm']:12.1%}{r['peak_mib']:10.1f}")
    print(f"speedup (tokens/s) {result['speedup']:.2f}x   peak memory ratio {result['memory_ratio']:.2f}x   "
          f"max loss difference {drift:.2e}")
    g = result["gqa"]
    print(f"GQA ({GQA_CONFIG['num_query_groups']} K/V head): ours {g['ours']['step_ms']:.1f} ms/step, HF "
          f"{g['hf']['step_ms']:.1f}: speedup {g['speedup']:.2f}x   max loss difference {g['max_loss_difference']:.2e}")
    write_json(args.json, [
        ratio_row("train step (fwd+bwd+AdamW), CPU fp32", "tokens/s", "HF LlamaForCausalLM", result["speedup"], "≥ 1.3×"),
        ratio_row("train step (fwd+bwd+AdamW), CPU fp32", "peak memory", "HF LlamaForCausalLM", result["memory_ratio"], "≤ 0.8×"),
        ratio_row("train step (fwd+bwd+AdamW), GQA, CPU fp32", "tokens/s", "HF LlamaForCausalLM",
                  result["gqa"]["speedup"], "≥ 1.3×"),
    ], result)


if __name__ == "__main__":
    main()
