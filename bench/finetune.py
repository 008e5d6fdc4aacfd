"""Instruction finetuning throughput: useful (answer) tokens per second of megallama's packed rows
against padded batches of the same examples and TRL's ``SFTTrainer`` with packing, CPU fp32.

Data: a length-skewed instruction set like chat data (log-normal lengths, median ~100 tokens,
a long tail to the sequence length), each example ~40% prompt, ~60% answer; only answer tokens are
trained, so only they count. The three sides train the same model shape with AdamW:

* packed: ``PackedSFTDataset`` rows of ``--seq`` positions (isolated examples), ``--rows`` a step;
* padded: the same examples, as many a step as the packed rows hold on average, padded to the
  longest of the batch (what a plain loop does);
* TRL: ``SFTTrainer(packing=True)`` (best-fit-decreasing packing, padding-free, completion-only
  loss) on ``transformers.LlamaForCausalLM`` with ``--rows`` packed rows a step.

The sides alternate step by step in one process (our two steps run from a callback after each TRL
step), so machine load hits all alike. Peak memory: each side in a process of its own (RSS high-water
mark during its steps minus RSS before the model is built; Linux).

    python bench/finetune.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch

from benchlib import add_json_flag, peak_rss_of, print_peak_rss, ratio_row, start_peak_rss, write_json
from megallama.config import LlamaConfig
from megallama.data.indexed import IndexedDataset, IndexedDatasetWriter
from megallama.data.instructions import output_prefixes
from megallama.data.sft_dataset import PackedSFTDataset
from megallama.model import LlamaModel, get_param_groups

CONFIG = dict(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=688,
              vocab_size=8000, max_position_embeddings=512)
LR, BETAS, WD = 1e-4, (0.9, 0.95), 0.1


def chat_like_examples(n: int, seq: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, loss mask) of ``n`` examples with log-normal lengths (many short, a few long)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(100), 0.9, n).astype(int), 16, seq + 1)
    out = []
    for length in lengths:
        ids = rng.integers(3, CONFIG["vocab_size"], length)
        mask = np.zeros(length, dtype=np.uint8)
        mask[max(2, int(0.4 * length)):] = 1
        out.append((ids, mask))
    return out


def packed_rows(examples, seq: int, folder: str) -> PackedSFTDataset:
    tokens_prefix, mask_prefix = output_prefixes(os.path.join(folder, "bench"))
    with IndexedDatasetWriter(tokens_prefix, np.uint16) as ids_out, IndexedDatasetWriter(mask_prefix, np.uint8) as m:
        for ids, mask in examples:
            ids_out.add_document(ids)
            m.add_document(mask)
    return PackedSFTDataset(IndexedDataset(tokens_prefix), IndexedDataset(mask_prefix), 0, len(examples), None,
                            seq, seed=0, pad_id=0, cache_dir=folder)


def packed_batches(dataset: PackedSFTDataset, rows: int):
    for start in range(0, len(dataset) - rows + 1, rows):
        items = [dataset[i] for i in range(start, start + rows)]
        yield {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in items[0]}


def padded_batches(examples, per_step: int, seed: int = 1):
    order = np.random.default_rng(seed).permutation(len(examples))
    for start in range(0, len(order) - per_step + 1, per_step):
        chosen = [examples[i] for i in order[start:start + per_step]]
        longest = max(len(ids) - 1 for ids, _ in chosen)
        tokens = torch.zeros(len(chosen), longest, dtype=torch.long)
        labels = torch.zeros_like(tokens)
        loss_mask = torch.zeros(len(chosen), longest)
        for r, (ids, mask) in enumerate(chosen):
            n = len(ids) - 1
            tokens[r, :n], labels[r, :n] = torch.as_tensor(ids[:-1]), torch.as_tensor(ids[1:])
            loss_mask[r, :n] = torch.as_tensor(mask[1:], dtype=torch.float32)
        yield {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}


def our_step_fn(seed: int = 0):
    torch.manual_seed(seed)
    model = LlamaModel(LlamaConfig(**CONFIG))
    opt = torch.optim.AdamW(get_param_groups(model, WD), lr=LR, betas=BETAS, fused=True)

    def step(batch) -> int:
        per_token = model(batch["tokens"], labels=batch["labels"], position_ids=batch.get("position_ids"))
        answers = batch["loss_mask"].sum()
        ((per_token * batch["loss_mask"]).sum() / answers).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(answers)
    return step


def trl_trainer(examples, seq: int, rows: int, steps: int, folder: str, callbacks=()):
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    hf_config = LlamaConfig(**CONFIG).to_hf()
    hf_config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_config).float()
    data = datasets.Dataset.from_dict({"input_ids": [ids.tolist() for ids, _ in examples],
                                       "completion_mask": [m.tolist() for _, m in examples]})
    args = SFTConfig(output_dir=folder, max_steps=steps, per_device_train_batch_size=rows, max_length=seq,
                     packing=True, completion_only_loss=True, learning_rate=LR, adam_beta1=BETAS[0],
                     adam_beta2=BETAS[1], weight_decay=WD, lr_scheduler_type="constant", use_cpu=True,
                     report_to="none", save_strategy="no", logging_steps=10 ** 6, dataloader_num_workers=0,
                     disable_tqdm=True, seed=0)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_stub_tokenizer(), pad_token="<pad>",
                                               eos_token="</s>")
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=list(callbacks))


def _stub_tokenizer():
    """TRL wants a tokenizer object even for pre-tokenized data; it only reads pad/eos from it."""
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 2, "<unk>": 1}, unk_token="<unk>"))


def trl_answers_per_row(trainer) -> float:
    """Trained (answer) tokens in an average packed row: TRL turns the completion mask into labels,
    -100 elsewhere."""
    return float(np.mean([sum(t != -100 for t in labels) for labels in trainer.train_dataset["labels"]]))


def memory_child(side: str, args) -> None:
    import transformers  # noqa: F401  (imported before the baseline, by both sides alike)
    import trl  # noqa: F401

    examples = chat_like_examples(args.examples, args.seq)
    with tempfile.TemporaryDirectory() as folder:
        if side == "trl":
            trainer = trl_trainer(examples, args.seq, args.rows, 3, folder)
            base = start_peak_rss()
            trainer.train()
        else:
            dataset = packed_rows(examples, args.seq, folder)
            per_step = round(args.rows * len(examples) / len(dataset))
            batches = packed_batches(dataset, args.rows) if side == "packed" else padded_batches(examples, per_step)
            base = start_peak_rss()
            step = our_step_fn()
            for _, batch in zip(range(3), batches):
                step(batch)
        print_peak_rss(base)


def peak_memory(side: str, args) -> float:
    return peak_rss_of(__file__, ["--memory-child", side, "--seq", str(args.seq), "--rows", str(args.rows),
                                  "--examples", str(args.examples), "--threads", str(args.threads)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="timed steps per side (alternated)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--seq", type=int, default=512, help="sequence length of a packed row")
    p.add_argument("--rows", type=int, default=4, help="packed rows per step (ours and TRL)")
    p.add_argument("--examples", type=int, default=1500, help="instruction examples generated")
    p.add_argument("--threads", type=int, default=2, help="torch threads (all sides)")
    add_json_flag(p)
    p.add_argument("--memory-child", choices=["packed", "padded", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.memory_child:
        memory_child(args.memory_child, args)
        return
    import transformers

    examples = chat_like_examples(args.examples, args.seq)
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as folder:
        dataset = packed_rows(examples, args.seq, folder)
        per_step = round(args.rows * len(examples) / len(dataset))  # examples a packed step holds on average
        ours = {"packed": (our_step_fn(), packed_batches(dataset, args.rows)),
                "padded": (our_step_fn(), padded_batches(examples, per_step))}
        times = {name: [] for name in ("packed", "padded", "trl")}
        answers = {name: [] for name in ("packed", "padded")}

        class Alternate(transformers.TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.start = time.perf_counter()

            def on_step_end(self, *a, **k):
                times["trl"].append(time.perf_counter() - self.start)
                for name, (step, batches) in ours.items():
                    batch = next(batches)
                    start = time.perf_counter()
                    answers[name].append(step(batch))
                    times[name].append(time.perf_counter() - start)

        trainer = trl_trainer(examples, args.seq, args.rows, total, folder, [Alternate()])
        trainer.train()
        trl_per_row = trl_answers_per_row(trainer)
    result = {"config": CONFIG, "seq": args.seq, "rows": args.rows, "examples": args.examples,
              "examples_per_padded_step": per_step, "threads": args.threads, "packed_rows": len(dataset),
              "example_lengths": {"median": float(np.median([len(e[0]) for e in examples])),
                                  "p95": float(np.percentile([len(e[0]) for e in examples], 95))}}
    for name in ("packed", "padded", "trl"):
        t = times[name][args.warmup:]
        useful = answers[name][args.warmup:] if name != "trl" else [trl_per_row * args.rows] * len(t)
        result[name] = {"step_ms": statistics.median(t) * 1e3, "answer_tokens_per_step": float(np.mean(useful)),
                        "answer_tokens_per_s": sum(useful) / sum(t), "peak_mib": peak_memory(name, args)}
    result["vs_padded"] = result["packed"]["answer_tokens_per_s"] / result["padded"]["answer_tokens_per_s"]
    result["vs_trl"] = result["packed"]["answer_tokens_per_s"] / result["trl"]["answer_tokens_per_s"]
    result["memory_vs_trl"] = result["packed"]["peak_mib"] / result["trl"]["peak_mib"]
    print(f"instruction finetuning, CPU fp32, {args.threads} threads, {args.examples} examples "
          f"(median {result['example_lengths']['median']:.0f} tokens, p95 {result['example_lengths']['p95']:.0f}), "
          f"seq {args.seq}")
    print(f"{'':8}{'ms/step':>10}{'answers/step':>14}{'answers/s':>11}{'peak MiB':>10}")
    for name in ("packed", "padded", "trl"):
        r = result[name]
        print(f"{name:8}{r['step_ms']:10.1f}{r['answer_tokens_per_step']:14.0f}{r['answer_tokens_per_s']:11.0f}"
              f"{r['peak_mib']:10.1f}")
    print(f"packed vs padded {result['vs_padded']:.2f}x   packed vs TRL {result['vs_trl']:.2f}x   "
          f"peak memory vs TRL {result['memory_vs_trl']:.2f}x")
    bench = "SFT packed (isolated examples), CPU fp32"
    write_json(args.json, [
        ratio_row(bench, "answer tokens/s", "padded batches, same examples", result["vs_padded"], "≥ 2×"),
        ratio_row(bench, "answer tokens/s", "TRL SFTTrainer, packing", result["vs_trl"], "≥ 1.3×"),
        ratio_row(bench, "peak memory", "TRL SFTTrainer, packing", result["memory_vs_trl"]),
    ], result)


if __name__ == "__main__":
    main()
