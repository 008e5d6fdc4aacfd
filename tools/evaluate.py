#!/usr/bin/env python
"""Evaluate a checkpoint: perplexity on an indexed dataset or a JSONL file, and zero-shot
multiple choice as in the LLaMA paper.

  python tools/evaluate.py --load SAVE --data-path data/wiki_text_document --seq-length 2048
  python tools/evaluate.py --load hf_out --jsonl valid.jsonl --tokenizer-model tokenizer.model
  python tools/evaluate.py --load SAVE --multiple-choice piqa.jsonl --tokenizer-model tokenizer.model

Multiple choice reads lines {"context": ..., "choices": [...], "answer": index or choice text}
and reports accuracy by the choices' log-likelihood: plain, per character and per token. Lines
that cannot be used are counted by reason and reported. Under torchrun the model is split over all
processes with tensor parallelism. The report is printed and, with --output, written as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, metavar="DIR",
                   help="checkpoint: a megallama save folder (any TP/PP layout), an HF folder or a Meta folder")
    p.add_argument("--tokenizer-model", metavar="M",
                   help="SentencePiece model or Hugging Face tokenizer folder, for --jsonl and --multiple-choice "
                        "(default: the one stored with the checkpoint)")
    p.add_argument("--tokenizer-type", default=None,
                   choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"],
                   help="SentencePieceTokenizer (LLaMA, LLaMA-2) or HuggingFaceTokenizer (LLaMA-3: --tokenizer-model "
                        "is then the folder holding tokenizer.json); default: told by the tokenizer path (a folder "
                        "is a Hugging Face tokenizer)")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--data-path", metavar="PREFIX",
                      help="perplexity over the sequences of an indexed dataset (PREFIX.bin / PREFIX.idx)")
    task.add_argument("--jsonl", metavar="FILE", help="perplexity over the texts of a JSONL file (BOS prepended)")
    task.add_argument("--multiple-choice", metavar="FILE", help="zero-shot multiple-choice accuracy over a JSONL file")
    p.add_argument("--json-key", default="text", help="--jsonl: the key holding the text (default text)")
    p.add_argument("--seq-length", type=int, metavar="N",
                   help="perplexity: tokens of context per window (default: the model's max positions)")
    p.add_argument("--max-sequences", type=int, metavar="N", help="perplexity: score only the first N sequences")
    p.add_argument("--micro-batch-size", type=int, default=8, metavar="N",
                   help="windows (perplexity) or choices (multiple choice) per forward pass (default 8)")
    p.add_argument("--output", metavar="FILE.json", help="also write the report to this JSON file")
    return p


def _tokenizer(args, model, reader):
    from megallama.checkpoint import load_matching_tokenizer

    path = args.tokenizer_model or reader.tokenizer_model()
    if path is None:
        raise ValueError(f"{args.load} holds no tokenizer (tokenizer.model or tokenizer.json): give --tokenizer-model")
    return load_matching_tokenizer(model.config, path, args.tokenizer_type)


def run(args, model, reader) -> dict:
    import itertools

    from megallama.inference import evaluation
    from megallama.inference.runtime import is_rank0

    progress = is_rank0()
    if args.multiple_choice:
        examples, skipped = evaluation.read_multiple_choice(args.multiple_choice)
        report = evaluation.multiple_choice_accuracy(model, _tokenizer(args, model, reader), examples,
                                                     args.micro_batch_size, progress)
        return {"task": "multiple_choice", "file": args.multiple_choice, **report, "skipped": dict(skipped)}
    skipped = Counter()
    if args.data_path:
        from megallama.data.indexed import IndexedDataset

        dataset = IndexedDataset(args.data_path)
        sequences = (dataset[i] for i in range(len(dataset)))
        pad_id, source = 0, {"data_path": args.data_path}
    else:
        from megallama.data.jsonl import iter_texts

        tokenizer = _tokenizer(args, model, reader)
        sequences = ([tokenizer.bos_id] + tokenizer.encode(t) for t in iter_texts([args.jsonl], (args.json_key,),
                                                                                  skipped=skipped))
        pad_id, source = tokenizer.pad_id, {"jsonl": args.jsonl}
    if args.max_sequences is not None:
        sequences = itertools.islice(sequences, args.max_sequences)
    seq_length = args.seq_length or model.config.max_position_embeddings
    report = evaluation.perplexity(model, sequences, seq_length, args.micro_batch_size, pad_id, progress)
    return {"task": "perplexity", **source, "seq_length": seq_length, **report, "skipped": dict(skipped)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("seq_length", "max_sequences", "micro_batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"error: --{flag.replace('_', '-')} must be at least 1, got {value}", file=sys.stderr)
            return 2
    if args.output and os.path.isdir(args.output):  # found before the evaluation, not after it
        print(f"error: --output {args.output} is a folder; give the report's file name", file=sys.stderr)
        return 2
    from megallama.checkpoint import load_model
    from megallama.fileio import atomic_open
    from megallama.inference.generation import prepare_for_inference
    from megallama.inference.runtime import init_tensor_parallel_from_env, is_rank0, shutdown

    device = init_tensor_parallel_from_env()
    try:
        model, reader = load_model(args.load, device=device)
        prepare_for_inference(model)
    except (OSError, KeyError, ValueError, RuntimeError) as e:  # RuntimeError: a damaged checkpoint (CheckpointError)
        print(f"error: {e}", file=sys.stderr)
        shutdown()
        return 1
    try:
        report = run(args, model, reader)
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        shutdown()
        return 1
    if is_rank0():
        text = json.dumps(report, indent=2)
        print(text)
        if args.output:
            try:
                with atomic_open(args.output, "w") as f:
                    f.write(text + "\n")
            except OSError as e:
                print(f"error: cannot write --output {args.output}: {e}", file=sys.stderr)
                shutdown()
                return 1
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
