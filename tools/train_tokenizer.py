#!/usr/bin/env python
"""Train LLaMA's kind of SentencePiece tokenizer (BPE, digits split, byte fallback) on JSONL text.

    python tools/train_tokenizer.py --input data/*.jsonl.zst --vocab-size 32000 --output-prefix tok/llama

writes ``tok/llama.model`` and ``tok/llama.vocab``. Each line of each document is one training
sentence (newlines then fall back to bytes, as in LLaMA's tokenizer).
"""
import argparse
import itertools
import os
import sys
from collections import Counter

from megallama.data.jsonl import expand_inputs, format_skips, iter_texts
from megallama.fileio import make_folder
from megallama.tokenizer import train_sentencepiece


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL files (.gz/.zst too) or globs")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON fields holding the text (default: text)")
    p.add_argument("--vocab-size", type=int, required=True, help="number of pieces, e.g. 32000 as LLaMA")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="train on this many sentences sampled from the corpus (0: all); bounds memory on large corpora")
    p.add_argument("--max-sentence-length", type=int, default=16384,
                   help="longest training sentence in bytes; longer ones are skipped by SentencePiece")
    p.add_argument("--character-coverage", type=float, default=0.99995,
                   help="share of characters covered by pieces; rarer ones fall back to bytes")
    p.add_argument("--num-threads", type=int, default=None, help="training threads (default: all cores)")
    p.add_argument("--strict", action="store_true", help="fail on the first unusable JSONL line instead of skipping it")
    args = p.parse_args(argv)
    # SentencePiece checks these only after reading the corpus, in a line of C++ source
    if args.vocab_size < 1:
        p.error(f"--vocab-size must be at least 1, got {args.vocab_size}")
    if not 0.98 <= args.character_coverage <= 1.0:
        p.error(f"--character-coverage must be within [0.98, 1] (SentencePiece's range), got {args.character_coverage}")
    if args.num_threads is not None and args.num_threads < 1:
        p.error(f"--num-threads must be at least 1, got {args.num_threads}")
    return args


def sentences(paths, json_keys, strict, skipped):
    for text in iter_texts(paths, json_keys, strict, skipped):
        for line in text.split("\n"):
            if line.strip():
                yield line


def main(argv=None) -> int:
    args = parse_args(argv)
    skipped = Counter()
    try:
        stream = sentences(expand_inputs(args.input), args.json_keys, args.strict, skipped)
        first = next(stream, None)
        if first is None:  # SentencePiece's own message is "[!sentences_.empty()]"
            raise ValueError(f"no text to train on in --input (key {', '.join(args.json_keys)}; skipped lines: "
                             f"{format_skips(skipped)})")
        make_folder(os.path.dirname(os.path.abspath(args.output_prefix)), "--output-prefix")
        model = train_sentencepiece(
            itertools.chain([first], stream), args.vocab_size, args.output_prefix,
            input_sentence_size=args.input_sentence_size, num_threads=args.num_threads,
            max_sentence_length=args.max_sentence_length, character_coverage=args.character_coverage,
        )
    except (OSError, ValueError, RuntimeError) as exc:  # bad input, a bad line in --strict, SentencePiece's refusals
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {model} and {args.output_prefix}.vocab; skipped lines: {format_skips(skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
