#!/usr/bin/env python
"""Tokenize instruction data into ids + a loss mask (Megatron's indexed format), for finetuning.

    python tools/preprocess_instructions.py --input alpaca_data.jsonl --format alpaca \\
        --tokenizer-model tok/llama.model --output-prefix sft/alpaca --workers 2

writes ``sft/alpaca_text_document.{bin,idx}`` (one document per conversation) and
``sft/alpaca_loss_mask_document.{bin,idx}`` (1 on answer tokens and the EOS, or ``<|eot_id|>``,
ending each answer); ``--sft-data-path sft/alpaca`` trains on them. The templates (``llama2``, and
``llama3`` for a LLaMA-3 Hugging Face tokenizer folder) are documented in
megallama/data/instructions.py; unusable records are counted by reason (``--strict`` fails on them).
"""
import argparse
import sys

from megallama.data.instructions import (CHAT_TEMPLATES, FORMATS, format_instruction_summary,
                                         preprocess_instructions)
from megallama.data.jsonl import BadLineError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL files (.gz and .zst too), several or a glob")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="alpaca: instruction/input/output; messages: a list of role/content turns; "
                   "flan: inputs/targets")
    p.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model file or Hugging Face tokenizer folder (tokenizer.json)")
    p.add_argument("--tokenizer-type", choices=("SentencePieceTokenizer", "HuggingFaceTokenizer"),
                   help="default: HuggingFaceTokenizer for a folder, SentencePieceTokenizer for a file")
    p.add_argument("--output-prefix", required=True,
                   help="outputs are PREFIX_text_document and PREFIX_loss_mask_document (.bin/.idx)")
    p.add_argument("--template", default="llama2", choices=sorted(CHAT_TEMPLATES),
                   help="prompt template the conversations are rendered with: llama2 ([INST] … [/INST]) or "
                   "llama3 (LLaMA-3-instruct's headers and <|eot_id|>; needs those special tokens)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_argument("--strict", action="store_true",
                   help="fail on the first unusable record (naming file and line) instead of skipping it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        summary = preprocess_instructions(args.input, args.output_prefix, args.format, args.tokenizer_model,
                                          args.template, args.workers, args.strict,
                                          progress=not args.no_progress, tokenizer_type=args.tokenizer_type)
    # OSError: also TruncatedInput and an unwritable output; RuntimeError: SentencePiece refusing a file that is no model
    except (BadLineError, OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the outputs are renamed into place only when complete: say so instead of a traceback
        print(f"\ninterrupted: nothing written to {args.output_prefix}_*_document.{{bin,idx}}; rerun the command",
              file=sys.stderr)
        return 130
    print(format_instruction_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
