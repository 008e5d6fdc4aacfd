#!/usr/bin/env python
"""Train the paper's quality classifier: pages used as references in Wikipedia (positive) vs.
random CommonCrawl pages (negative), a fastText linear model for clean_corpus.py --quality-model.

  python tools/train_quality_classifier.py --positive refs.jsonl --negative random.jsonl \\
      --output quality.bin

Inputs are JSONL files with a "text" field (e.g. clean_corpus.py output) or plain .txt files
(one document per file).
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterator

from megallama.compressed import open_binary, strip_compression
from megallama.clean.io import JSONDecodeError, loads
from megallama.clean.quality import train_quality_classifier


def read_texts(paths: list[str], limit: int | None) -> Iterator[str]:
    """Texts of JSONL rows (field "text") or whole .txt files, at most `limit`."""
    n = 0
    for path in paths:
        with open_binary(path) as f:
            if strip_compression(path).endswith(".txt"):
                rows = [f.read().decode("utf-8", "replace")]
            else:
                rows = []
                for lineno, raw in enumerate(f, 1):
                    if not raw.strip():
                        continue
                    try:
                        rows.append(loads(raw)["text"])
                    except (JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{path}:{lineno}: not a JSON object with a \"text\" field ({e})") from None
        for text in rows:
            if limit is not None and n >= limit:
                return
            n += 1
            yield text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positive", nargs="+", required=True, metavar="PATH",
                   help="reference-like pages (JSONL with \"text\", or .txt files)")
    p.add_argument("--negative", nargs="+", required=True, metavar="PATH",
                   help="random pages (JSONL with \"text\", or .txt files)")
    p.add_argument("--output", required=True, metavar="MODEL.bin", help="where to save the fastText model")
    p.add_argument("--max-per-class", type=int, default=None, metavar="N",
                   help="use at most N texts of each class (default: all)")
    p.add_argument("--epoch", type=int, default=5, help="fastText training epochs (default 5)")
    p.add_argument("--lr", type=float, default=0.1, help="fastText learning rate (default 0.1)")
    p.add_argument("--word-ngrams", type=int, default=2, help="word n-gram features (default 2: bigrams)")
    p.add_argument("--dim", type=int, default=100, help="embedding size (default 100)")
    p.add_argument("--bucket", type=int, default=2_000_000,
                   help="hash buckets for word n-grams (default 2000000; the model holds bucket x dim floats)")
    args = p.parse_args(argv)
    try:
        counts = train_quality_classifier(read_texts(args.positive, args.max_per_class),
                                          read_texts(args.negative, args.max_per_class), args.output,
                                          epoch=args.epoch, lr=args.lr, word_ngrams=args.word_ngrams, dim=args.dim,
                                          bucket=args.bucket)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # RuntimeError: fastText training failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"trained on {counts['positive']} reference and {counts['negative']} random pages -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
