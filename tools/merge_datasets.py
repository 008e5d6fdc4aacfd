#!/usr/bin/env python
"""Concatenate indexed datasets (same token dtype) into one, as Megatron's merge tool does.

    python tools/merge_datasets.py --input out/cc_part0_text_document out/cc_part1_text_document \\
        --output-prefix out/cc_text_document
"""
import argparse
import sys

from megallama.data.indexed import merge_indexed_datasets


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes (PREFIX.bin/.idx), merged in this order")
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin/.idx")
    args = p.parse_args(argv)
    try:
        merged = merge_indexed_datasets(args.input, args.output_prefix)
    except (OSError, ValueError) as exc:  # a missing or damaged input, an unwritable output
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_prefix}.{{bin,idx}}: {merged.num_documents:,} documents, {merged.num_tokens:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
