#!/usr/bin/env python
"""Tokenize JSONL corpora into Megatron's indexed format, with Megatron's flags.

    python tools/preprocess_data.py --input data/c4/*.jsonl.zst --json-keys text \\
        --output-prefix out/c4 --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model tok/llama.model --append-eod --workers 2

writes ``out/c4_text_document.bin/.idx``. For LLaMA-3, ``--tokenizer-type HuggingFaceTokenizer
--tokenizer-model DIR`` with DIR holding tokenizer.json (and tokenizer_config.json); as with
SentencePiece no BOS is added, ``--append-eod`` ends documents with the EOS token.

Memory stays bounded whatever the input size; unusable lines are skipped and counted (``--strict``
makes them fatal). ``--executor ray`` tokenizes the input files in parallel across a Ray cluster
and merges them into the same outputs, byte for byte.
"""
import argparse
import sys

from megallama.data.jsonl import BadLineError
from megallama.data.preprocess import format_summary, preprocess
from megallama.executors.cli import add_executor_arguments, executor_from_args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL files (.gz and .zst too), several or a glob")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="JSON fields to tokenize; each gets its own PREFIX_KEY_document output")
    p.add_argument("--output-prefix", required=True, help="outputs are PREFIX_KEY_document.bin/.idx")
    p.add_argument("--tokenizer-type", default="SentencePieceTokenizer",
                   choices=["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                            "HuggingFaceTokenizer", "NullTokenizer"],
                   help="tokenizer kind (SentencePiece for LLaMA and LLaMA-2, HuggingFaceTokenizer for LLaMA-3)")
    p.add_argument("--tokenizer-model",
                   help="SentencePiece .model file, or for HuggingFaceTokenizer the folder holding tokenizer.json")
    p.add_argument("--vocab-size", type=int, help="vocabulary size, for NullTokenizer")
    p.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document id")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (with --executor local)")
    add_executor_arguments(p)
    p.add_argument("--log-interval", type=int, default=1000, help="documents between progress-bar updates")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first unusable line (naming file and line) instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with executor_from_args(args) as executor:
            summary = preprocess(args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
                                 args.vocab_size, args.json_keys, args.append_eod, args.workers,
                                 args.log_interval, args.strict, progress=not args.no_progress,
                                 executor=executor if args.executor == "ray" else None)
    except (BadLineError, OSError, RuntimeError, ValueError) as exc:  # OSError: also TruncatedInput, an unwritable output
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the outputs are renamed into place only when complete: say so instead of a traceback
        print(f"\ninterrupted: nothing written to {args.output_prefix}_*_document.{{bin,idx}}; rerun the command",
              file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
