#!/usr/bin/env python
"""Clean one source of the LLaMA mixture into JSONL for tools/preprocess_data.py.

  python tools/clean_corpus.py --source commoncrawl --input CC-MAIN-*.warc.wet.gz \\
      --output cleaned/commoncrawl --report cleaned/commoncrawl.json --workers 16

Each output line is {"text": ..., "meta": {"source", "id" or "url", "lang", "lang_score", ...}}.
Rerunning the same command after a crash finishes the shards left and gives the same output.
"""

from __future__ import annotations

import argparse
import sys

from megallama.clean.runner import clean_corpus
from megallama.clean.sources import SOURCES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=SOURCES,
                   help="which cleaner to run (the paper's per-source recipe)")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH",
                   help="input files or folders (folders are searched for the source's file types); "
                        "each file is one shard")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="folder for the cleaned JSONL files (one per shard) and the resume state")
    p.add_argument("--report", required=True, metavar="FILE.json",
                   help="JSON report: input_docs, output_docs and dropped (count per reason)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes working on shards in parallel (default 1; the output does not depend on it)")
    p.add_argument("--keep-rejected", metavar="DIR",
                   help="also write every dropped document, with its reason in meta, as JSONL in DIR")
    p.add_argument("--quality-model", metavar="M",
                   help="fastText model from tools/train_quality_classifier.py: keep only pages it "
                        "scores as reference-like (probability >= 0.5)")
    return p


def format_report(report: dict) -> str:
    """Kept/dropped summary, one reason per line, largest first."""
    n = max(report["input_docs"], 1)
    lines = [f"{report['source']}: {report['input_docs']} documents in {report['shards']} shards",
             f"  kept     {report['output_docs']:>10}  ({100 * report['output_docs'] / n:.1f}%)"]
    for reason, count in sorted(report["dropped"].items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  dropped  {count:>10}  ({100 * count / n:.1f}%)  {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        report = clean_corpus(args.source, args.input, args.output, args.report, workers=args.workers,
                              keep_rejected=args.keep_rejected, quality_model=args.quality_model,
                              progress=True)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
