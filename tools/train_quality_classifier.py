#!/usr/bin/env python
"""Train the paper's quality classifier: pages used as references in Wikipedia (positive) vs.
random CommonCrawl pages (negative), a fastText linear model for clean_corpus.py --quality-model.

  python tools/train_quality_classifier.py --positive refs.jsonl --negative random.jsonl \\
      --output quality.bin

Inputs are JSONL files with a "text" field (e.g. clean_corpus.py output) or plain .txt files
(one document per file). Unusable JSONL lines are skipped and counted (``--strict`` fails on them).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from typing import Iterator

from megallama.clean.quality import train_quality_classifier
from megallama.compressed import open_binary, strip_compression
from megallama.data.jsonl import expand_inputs, format_skips, iter_texts
from megallama.fileio import make_folder


def read_texts(paths: list[str], limit: int | None, strict: bool, skipped: Counter) -> Iterator[str]:
    """Texts of JSONL rows (field "text") or whole .txt files, at most `limit`; skipped lines are
    counted in `skipped` by reason."""
    n = 0
    for path in paths:
        if strip_compression(path).endswith(".txt"):
            with open_binary(path) as f:
                rows = [f.read().decode("utf-8", "replace")]
        else:
            rows = iter_texts([path], ("text",), strict, skipped)
        for text in rows:
            if limit is not None and n >= limit:
                return
            n += 1
            yield text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positive", nargs="+", required=True, metavar="PATH",
                   help="reference-like pages (JSONL with \"text\", or .txt files); files or quoted globs")
    p.add_argument("--negative", nargs="+", required=True, metavar="PATH",
                   help="random pages (JSONL with \"text\", or .txt files); files or quoted globs")
    p.add_argument("--output", required=True, metavar="MODEL.bin", help="where to save the fastText model")
    p.add_argument("--max-per-class", type=int, default=None, metavar="N",
                   help="use at most N texts of each class (default: all)")
    p.add_argument("--epoch", type=int, default=5, help="fastText training epochs (default 5)")
    p.add_argument("--lr", type=float, default=0.1, help="fastText learning rate (default 0.1)")
    p.add_argument("--word-ngrams", type=int, default=2, help="word n-gram features (default 2: bigrams)")
    p.add_argument("--dim", type=int, default=100, help="embedding size (default 100)")
    p.add_argument("--bucket", type=int, default=2_000_000,
                   help="hash buckets for word n-grams (default 2000000; the model holds bucket x dim floats)")
    p.add_argument("--strict", action="store_true", help="fail on the first unusable JSONL line instead of skipping it")
    args = p.parse_args(argv)
    # fastText takes all of these without a word (0 epochs saves an untrained model): refuse before reading
    for flag, value in (("--epoch", args.epoch), ("--word-ngrams", args.word_ngrams), ("--dim", args.dim),
                        ("--max-per-class", args.max_per_class)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr:g}")
    if args.bucket < (1 if args.word_ngrams > 1 else 0):
        p.error(f"--bucket must be at least {1 if args.word_ngrams > 1 else 0} with --word-ngrams {args.word_ngrams}, "
                f"got {args.bucket}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    skipped: Counter = Counter()
    try:
        make_folder(os.path.dirname(os.path.abspath(args.output)), "--output")
        positive, negative = expand_inputs(args.positive, "--positive"), expand_inputs(args.negative, "--negative")
        counts = train_quality_classifier(read_texts(positive, args.max_per_class, args.strict, skipped),
                                          read_texts(negative, args.max_per_class, args.strict, skipped),
                                          args.output, epoch=args.epoch, lr=args.lr, word_ngrams=args.word_ngrams,
                                          dim=args.dim, bucket=args.bucket)
    # OSError: also a truncated input; ValueError: also a bad line with --strict; RuntimeError: fastText failed
    except (OSError, ValueError, RuntimeError) as e:
        # the skips explain a class left empty ("need both classes"), e.g. JSONL without "text"
        print(f"error: {e}" + (f"; skipped lines: {format_skips(skipped)}" if skipped else ""), file=sys.stderr)
        return 1
    print(f"trained on {counts['positive']} reference and {counts['negative']} random pages -> {args.output}; "
          f"skipped lines: {format_skips(skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
