"""Greedy generation tokens/s: megallama's KV-cache generate against transformers' ``generate``.

Same weights (ours are loaded from the HF model), same prompts, CPU fp32, both with their key/value
cache. Each round runs one full generation per side, alternating, so machine load hits both alike;
the figure is the median over rounds of new tokens (batch × new tokens) per second. The two sides'
tokens are compared too: a speedup from generating something else would mean nothing. The same
model with grouped-query attention (one K/V head for its four query heads, LLaMA-2-70B's and
LLaMA-3's ratio of 8:1 taken further) is measured as a second case against HF with the same config.

    python bench/generate.py                 # batch 1 and 8, 128 new tokens, 2 threads
    python bench/generate.py --rounds 3      # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from megallama.config import LlamaConfig
from megallama.inference import generate, prepare_for_inference
from megallama.model import LlamaModel

# bench/train_step.py's model
CONFIG = dict(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=688,
              vocab_size=8000, max_position_embeddings=512)
GQA_CONFIG = dict(CONFIG, num_query_groups=CONFIG["num_attention_heads"] // 4)


def build(config: LlamaConfig, seed: int = 0):
    """(ours, hf) with identical weights; norms randomised so that they matter."""
    import transformers

    torch.manual_seed(seed)
    hf_cfg = config.to_hf()
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.generation_config.eos_token_id = None  # both sides generate exactly --new-tokens tokens
    hf.generation_config.pad_token_id = 0
    ours = LlamaModel(config)
    ours.load_hf_state_dict(hf.state_dict())
    return prepare_for_inference(ours), hf  # as tools/generate.py loads it


def run_ours(model, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    return generate(model, prompts.tolist(), new_tokens, eos_id=None)


def run_hf(model, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
    return out[:, prompts.shape[1]:].tolist()


def measure(ours, hf, batch: int, prompt_len: int, new_tokens: int, rounds: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=g)
    sides = {"ours": lambda: run_ours(ours, prompts, new_tokens), "hf": lambda: run_hf(hf, prompts, new_tokens)}
    for run in sides.values():  # warm-up
        run()
    times = {name: [] for name in sides}
    cpu_times = {name: [] for name in sides}
    outputs = {}
    for _ in range(rounds):
        for name, run in sides.items():
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = run()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    same = sum(a == b for ra, rb in zip(outputs["ours"], outputs["hf"]) for a, b in zip(ra, rb))
    result = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
              "token_agreement": same / (batch * new_tokens)}
    for name in sides:
        t, c = statistics.median(times[name]), statistics.median(cpu_times[name])
        result[name] = {"seconds": t, "tokens_per_s": batch * new_tokens / t, "cpu_seconds": c}
    result["speedup"] = result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    result["cpu_time_ratio"] = result["hf"]["cpu_seconds"] / result["ours"]["cpu_seconds"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row")
    p.add_argument("--rounds", type=int, default=5, help="timed generations per side and batch size (alternated)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (both sides)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cases = {}  # case name → (config, results at each batch size)
    for name, fields in (("", CONFIG), ("GQA", GQA_CONFIG)):
        config = LlamaConfig(**fields)
        ours, hf = build(config)
        cases[name] = fields, [measure(ours, hf, b, args.prompt_len, args.new_tokens, args.rounds,
                                       config.vocab_size) for b in args.batch]
    print(f"greedy generation, CPU fp32, {args.threads} threads, {args.prompt_len}-token prompts, "
          f"{args.new_tokens} new tokens, median of {args.rounds} alternated rounds")
    print(f"{'case':>5}{'batch':>6}{'ours tok/s':>12}{'HF tok/s':>11}{'speedup':>9}{'CPU-time ratio':>16}"
          f"{'same tokens':>13}")
    for name, (_, results) in cases.items():
        for r in results:
            print(f"{name or 'MHA':>5}{r['batch']:6d}{r['ours']['tokens_per_s']:12.0f}{r['hf']['tokens_per_s']:11.0f}"
                  f"{r['speedup']:8.2f}x{r['cpu_time_ratio']:15.2f}x{r['token_agreement']:13.1%}")
    if args.json:
        tmp = args.json + ".tmp"
        summary = [{"benchmark": f"greedy generation{', ' + name if name else ''}, batch {r['batch']}, "
                                 f"{r['new_tokens']} new tokens, CPU fp32, {args.threads} threads",
                    "metric": "tokens/s", "peer": "HF generate (KV cache)", "ratio": r["speedup"],
                    "target": "≥ 1.5×"} for name, (_, results) in cases.items() for r in results]
        details = {"config": CONFIG, "threads": args.threads, "results": cases[""][1],
                   "gqa_config": GQA_CONFIG, "gqa_results": cases["GQA"][1]}
        with open(tmp, "w") as f:
            json.dump({"summary": summary, "details": details}, f, indent=2)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
