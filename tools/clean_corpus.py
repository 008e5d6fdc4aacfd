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

from megallama.clean.io import DEFAULT_MAX_RECORD_BYTES
from megallama.clean.runner import clean_corpus
from megallama.clean.sources import SOURCES, make_source
from megallama.executors.cli import add_executor_arguments, executor_from_args


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
                   help="JSON report: input_docs, output_docs, dropped (count per reason) and "
                        "shards_without_documents (non-empty input files that gave none: a wrong format?)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="with --executor local: processes working on shards in parallel (default 1; the "
                        "output does not depend on it)")
    add_executor_arguments(p)
    p.add_argument("--dedup-partitions", type=int, metavar="N",
                   help="hash partitions of the cross-shard dedup (default: one per GiB of input); each "
                        "dedup task holds one partition's hashes, so memory per task stays flat as the "
                        "corpus grows; the output does not depend on it")
    p.add_argument("--keep-rejected", metavar="DIR",
                   help="also write every dropped document, with its reason in meta, as JSONL in DIR")
    p.add_argument("--quality-model", metavar="M",
                   help="fastText model from tools/train_quality_classifier.py: keep only pages it "
                        "scores as reference-like (probability >= --quality-threshold)")
    p.add_argument("--quality-threshold", type=float, default=0.5, metavar="P",
                   help="the --quality-model probability a page needs to be kept (default 0.5)")
    p.add_argument("--perplexity-model", metavar="LM",
                   help="CCNet's n-gram filter (commoncrawl, c4): KenLM model from tools/train_ngram_lm.py "
                        "(its tokenizer and cut-offs beside it); each page gets meta perplexity and bucket")
    p.add_argument("--perplexity-buckets", metavar="B,B",
                   help="buckets kept with --perplexity-model, from head,middle,tail (default head,middle for "
                        "commoncrawl, as RedPajama; all three for c4, which only labels)")
    p.add_argument("--perplexity-cutoffs", metavar="HEAD,TAIL",
                   help="perplexities bounding the buckets (head < HEAD <= middle < TAIL <= tail), instead of "
                        "those tools/train_ngram_lm.py --percentiles-from stored beside the model")
    p.add_argument("--max-record-bytes", type=int, default=DEFAULT_MAX_RECORD_BYTES, metavar="N",
                   help="largest record (JSONL line, WET record, archive member, book, page) read into memory, "
                        f"decompressed; larger ones are dropped as too_large (default {DEFAULT_MAX_RECORD_BYTES:,}: "
                        "a compressed bomb cannot take the machine's memory)")
    return p


def format_report(report: dict) -> str:
    """Kept/dropped summary, one reason per line, largest first."""
    n = max(report["input_docs"], 1)
    empty = f" ({report['shards_without_documents']} gave none)" if report["shards_without_documents"] else ""
    lines = [f"{report['source']}: {report['input_docs']} documents in {report['shards']} shards{empty}",
             f"  kept     {report['output_docs']:>10}  ({100 * report['output_docs'] / n:.1f}%)"]
    for reason, count in sorted(report["dropped"].items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  dropped  {count:>10}  ({100 * count / n:.1f}%)  {reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.dedup_partitions is not None and args.dedup_partitions < 1:
        print("error: --dedup-partitions must be at least 1", file=sys.stderr)
        return 2
    try:
        source = make_source(args.source, quality_model=args.quality_model, quality_threshold=args.quality_threshold,
                             max_record_bytes=args.max_record_bytes, perplexity_model=args.perplexity_model,
                             perplexity_buckets=args.perplexity_buckets, perplexity_cutoffs=args.perplexity_cutoffs)
        with executor_from_args(args) as executor:
            report = clean_corpus(source, args.input, args.output, args.report, executor=executor,
                                  dedup_partitions=args.dedup_partitions, keep_rejected=args.keep_rejected,
                                  progress=True)
    except (OSError, ValueError, RuntimeError) as e:  # OSError: also an unreadable input or an unwritable output
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # finished shards are kept (completion markers): say so instead of a traceback
        print(f"\ninterrupted: rerun the same command to finish the shards left in {args.output}", file=sys.stderr)
        return 130
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
