#!/usr/bin/env python
"""How many epochs each source of a blend sees for a number of training tokens (the "epochs"
column of the LLaMA paper's Table 1).

    python tools/mixture_report.py --data-path 67 cc_text_document 15 c4_text_document ... --train-tokens 1.4e12
"""
import argparse
import sys

from megallama.data.blended import format_mixture_report, mixture_epochs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", nargs="+", required=True, help="Megatron's blend: W1 PREFIX1 W2 PREFIX2 ... or one prefix")
    p.add_argument("--train-tokens", type=float, required=True, help="tokens the run will train on, e.g. 1.4e12")
    args = p.parse_args(argv)
    if not args.train_tokens > 0:
        p.error(f"--train-tokens must be positive, got {args.train_tokens:g}")
    try:
        rows = mixture_epochs(args.data_path, args.train_tokens)
    except (OSError, ValueError) as exc:  # a malformed --data-path, a missing or damaged dataset
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_mixture_report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
