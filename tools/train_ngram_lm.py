#!/usr/bin/env python
"""Train CCNet's n-gram language model for the perplexity filter of tools/clean_corpus.py.

  python tools/train_ngram_lm.py --input clean/wikipedia/*.jsonl --tokenizer-model tok/wiki.model \\
      --order 5 --output lm/en.bin --percentiles-from clean/cc_sample/*.jsonl

The text is normalised and cut into SentencePiece pieces as the filter does, then streamed to
KenLM's lmplz (interpolated modified Kneser-Ney; built by `make install`). The output is ARPA, or
KenLM binary when it ends in `.bin`; beside it go OUTPUT.sp.model (the tokenizer) and OUTPUT.json
(order, counts and, with --percentiles-from, the head/middle/tail cut-offs: the 30th and 60th
percentiles of the sample documents' perplexities, as CCNet).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from typing import Iterator

from megallama.clean.document import Rejected
from megallama.clean.perplexity import train_ngram_lm
from megallama.clean.sources.base import iter_jsonl
from megallama.fileio import make_folder


def iter_texts(paths: list[str], key: str, rejected: Counter) -> Iterator[str]:
    """The `key` field of each JSONL row; unreadable rows and rows without it are counted."""
    for path in paths:
        for _, obj in iter_jsonl(path):
            if isinstance(obj, Rejected):
                rejected[obj.reason] += 1
            elif not isinstance(obj.get(key), str):
                rejected[f"missing_{key}"] += 1
            else:
                yield obj[key]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", metavar="FILE.jsonl",
                   help="JSONL training text (e.g. cleaned Wikipedia; .gz/.bz2/.xz/.zst too), streamed")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rejected: Counter = Counter()
    sample = iter_texts(args.percentiles_from, args.json_key, rejected) if args.percentiles_from else None
    try:
        make_folder(os.path.dirname(os.path.abspath(args.output)), "--output")
        info = train_ngram_lm(iter_texts(args.input, args.json_key, rejected), args.tokenizer_model, args.output,
                              order=args.order, memory=args.memory, sample=sample)
    except (OSError, ValueError, RuntimeError) as e:  # OSError: also an unwritable output
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.output}: {args.order}-gram model of {info['documents']} documents ({info['lines']} lines)")
    if "cutoffs" in info:
        c = info["cutoffs"]
        print(f"  buckets from {c['sample_docs']} sample documents: head < {c['head']:.1f} <= middle < "
              f"{c['tail']:.1f} <= tail")
    for reason, count in sorted(rejected.items()):
        print(f"  skipped {count} input rows: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
