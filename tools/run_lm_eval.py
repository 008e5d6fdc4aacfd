#!/usr/bin/env python
"""lm-evaluation-harness's command line with the ``megallama`` model registered.

    python tools/run_lm_eval.py --model megallama --model_args load=SAVE,tokenizer_model=tok.model \\
        --tasks mmlu --num_fewshot 5 --batch_size 8
    torchrun --nproc-per-node 2 tools/run_lm_eval.py --model megallama --model_args load=SAVE --tasks hellaswag

Every flag is lm-eval's (``--help``); ``--model_args`` of ``megallama``: ``load`` (a megallama, HF or
Meta checkpoint, any layout), ``tokenizer_model`` (default: the one stored with it), ``dtype``
(float32, bfloat16, float16), ``max_length``, ``max_gen_toks``, ``batch_size``; any other name is
refused (lm-eval's ``--device`` is not used: the model runs on ``cuda:LOCAL_RANK`` when CUDA is
present, else on the CPU). Under torchrun the processes are the tensor-parallel ranks of one model;
only the first prints. Needs ``pip install -e .[eval]``.
"""
import contextlib
import os
import sys


def main() -> int:
    try:
        from lm_eval.__main__ import cli_evaluate

        from megallama.inference.lm_eval_adapter import ModelArgsError  # registers --model megallama
    except ImportError as error:
        print(f"error: {error}: install the eval extra (pip install -e .[eval])", file=sys.stderr)
        return 1
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)  # lm-eval's help below knows nothing of the megallama model's --model_args
    quiet = os.environ.get("RANK", "0") != "0"  # the other tensor-parallel ranks repeat rank 0's work
    with open(os.devnull, "w") as devnull, \
            contextlib.redirect_stdout(devnull) if quiet else contextlib.nullcontext():
        try:
            cli_evaluate()
        except ModelArgsError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
