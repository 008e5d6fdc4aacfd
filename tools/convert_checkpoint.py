#!/usr/bin/env python
"""Convert a LLaMA checkpoint between megallama's, Hugging Face's and Meta's formats.

  python tools/convert_checkpoint.py --load SAVE --save hf_out --target-format hf --tokenizer-model tokenizer.model
  python tools/convert_checkpoint.py --load llama-13b --save SAVE --target-format megallama \
      --target-tensor-parallel-size 2 --target-pipeline-parallel-size 4
  python tools/convert_checkpoint.py --load hf_out --save meta_out --target-format meta --target-tensor-parallel-size 2

Tensors are read and written one at a time, so the conversion needs about one output file (or one
rank's shard) of memory, not the whole model. Logits are equal before and after, every direction.
"""
from __future__ import annotations

import argparse
import os
import sys

from megallama.checkpoint import FORMATS, convert_checkpoint


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, metavar="DIR",
                   help="the checkpoint to convert: a megallama save folder (or one iter_NNNNNNN folder in it), "
                        "an HF folder (config.json + safetensors) or a Meta folder (params.json + consolidated.NN.pth)")
    p.add_argument("--save", required=True, metavar="DIR",
                   help="folder to write the converted checkpoint into: a new or empty one")
    p.add_argument("--target-format", required=True, choices=FORMATS, help="format to write")
    p.add_argument("--source-format", choices=FORMATS,
                   help="format of --load (default: detected from the files in it)")
    p.add_argument("--target-tensor-parallel-size", type=int, metavar="N",
                   help="megallama: tensor-parallel ranks to write for (default 1); meta: number of "
                        "consolidated.NN.pth files (default: as Meta ships the paper's sizes, 1/2/4/8 for "
                        "7B/13B/33B/65B, else 1)")
    p.add_argument("--target-pipeline-parallel-size", type=int, metavar="N",
                   help="megallama only: pipeline stages to write for (default 1)")
    p.add_argument("--tokenizer-model", metavar="M",
                   help="tokenizer to store with the checkpoint: a SentencePiece model (hf: also converted to HF "
                        "tokenizer files) or a Hugging Face tokenizer folder with tokenizer.json (LLaMA-3's; its "
                        "files are copied); default: the tokenizer stored with --load, if any")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("target_tensor_parallel_size", "target_pipeline_parallel_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"error: --{flag.replace('_', '-')} must be at least 1, got {value}", file=sys.stderr)
            return 2
    if os.path.exists(args.save) and not (os.path.isdir(args.save) and not os.listdir(args.save)):
        # Writing into a folder that holds files would mix two checkpoints (which one a later
        # --load detects is then a guess) or move a training save folder's tracker back to iteration 0.
        what = ("a folder holding " + ", ".join(sorted(os.listdir(args.save))[:5]) if os.path.isdir(args.save)
                else "a file")
        print(f"error: --save {args.save} is {what}: give a new or empty folder", file=sys.stderr)
        return 2
    try:
        source = convert_checkpoint(args.load, args.save, args.target_format, args.source_format,
                                    args.target_tensor_parallel_size, args.target_pipeline_parallel_size,
                                    args.tokenizer_model)
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.load} ({source}) -> {args.save} ({args.target_format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
