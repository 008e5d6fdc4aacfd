#!/usr/bin/env python
"""Train CCNet's n-gram language model for the perplexity filter of tools/clean_corpus.py.

  python tools/train_ngram_lm.py --input clean/wikipedia/*.jsonl --tokenizer-model tok/wiki.model \\
      --order 5 --output lm/en.bin --percentiles-from clean/cc_sample/*.jsonl

The text is normalised and cut into SentencePiece pieces as the filter does, then streamed to
KenLM's lmplz (interpolated modified Kneser-Ney; built by `make install`). The output is ARPA, or
KenLM binary when it ends in `.bin`; beside it go OUTPUT.sp.model (the tokenizer) and OUTPUT.json
(order, counts and, with --percentiles-from, the head/middle/tail cut-offs: the 30th and 60th
percentiles of the sample documents' perplexities, as CCNet). Unusable JSONL lines are skipped
and counted, as by the other data tools (``--strict`` fails on the first one).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

from megallama.clean.perplexity import train_ngram_lm
from megallama.data.jsonl import expand_inputs, format_skips, iter_texts
from megallama.fileio import make_folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", metavar="FILE.jsonl",
                   help="JSONL training text (e.g. cleaned Wikipedia; .gz/.bz2/.xz/.zst too), streamed; files or quoted globs")
    p.add_argument("--tokenizer-model", required=True, metavar="M",
                   help="SentencePiece model trained on the same text (CCNet: one per language)")
    p.add_argument("--output", required=True, metavar="LM",
                   help="model file: KenLM binary if it ends in .bin, else ARPA")
    p.add_argument("--order", type=int, default=5, help="n-gram order (default 5, as CCNet)")
    p.add_argument("--percentiles-from", nargs="+", metavar="SAMPLE.jsonl",
                   help="documents like those to be filtered (e.g. a CommonCrawl sample): store the 30th and "
                        "60th percentiles of their perplexities as the head/middle/tail cut-offs")
    p.add_argument("--json-key", default="text", help="the JSONL field holding the text (default text)")
    p.add_argument("--memory", default="20%",
                   help="lmplz's memory for sorting, e.g. 20%% or 8G (default 20%%); it spills to disk beyond")
    p.add_argument("--strict", action="store_true", help="fail on the first unusable JSONL line instead of skipping it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    skipped: Counter = Counter()
    keys = (args.json_key,)
    try:
        inputs = expand_inputs(args.input)
        sample = (iter_texts(expand_inputs(args.percentiles_from, "--percentiles-from"), keys, args.strict, skipped)
                  if args.percentiles_from else None)
        make_folder(os.path.dirname(os.path.abspath(args.output)), "--output")
        info = train_ngram_lm(iter_texts(inputs, keys, args.strict, skipped), args.tokenizer_model, args.output,
                              order=args.order, memory=args.memory, sample=sample)
    # OSError: also an unwritable output or a truncated input; ValueError: also a bad line with --strict
    except (OSError, ValueError, RuntimeError) as e:
        # "no text to train on" is explained by the lines skipped, e.g. all of them under another --json-key
        print(f"error: {e}" + (f"; skipped lines: {format_skips(skipped)}" if skipped else ""), file=sys.stderr)
        return 1
    print(f"{args.output}: {args.order}-gram model of {info['documents']} documents ({info['lines']} lines)")
    if "cutoffs" in info:
        c = info["cutoffs"]
        print(f"  buckets from {c['sample_docs']} sample documents: head < {c['head']:.1f} <= middle < "
              f"{c['tail']:.1f} <= tail")
    print(f"  skipped lines: {format_skips(skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
