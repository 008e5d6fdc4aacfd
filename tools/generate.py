#!/usr/bin/env python
"""Generate text from a megallama, HF or Meta checkpoint, with a key/value cache.

  python tools/generate.py --load SAVE --tokenizer-model tokenizer.model --prompt "The capital of France" --greedy
  torchrun --nproc-per-node 2 tools/generate.py --load SAVE --tokenizer-model tokenizer.model \
      --prompt-file prompts.txt --max-new-tokens 64 --temperature 0.8 --top-p 0.95 --seed 1

The prompt is prefilled once, then tokens come one at a time (no recomputation of the prefix).
Under torchrun the model is split over all processes with tensor parallelism (the checkpoint is
resharded on load, whatever layout saved it). With one prompt the continuation is printed as it
is generated; with several (batched together) each prompt and its continuation are printed when
the batch is done, with a progress bar meanwhile. Generation stops at the tokenizer's EOS, or where
the text holds a ``--stop`` string (cut off there, as lm-eval's ``until`` and vLLM's ``stop``).
``--temperature 0`` is greedy decoding, as in Meta's reference and vLLM. Where the longest prompt
plus ``--max-new-tokens`` exceeds the model's positions, fewer tokens are generated (Meta's
reference shortens the generation the same way) and a notice says so on stderr.

  python tools/generate.py --load SAVE --chat --prompt "What is a generator?" --greedy
  python tools/generate.py --load SAVE --chat        # an interactive chat on stdin

``--chat`` renders each prompt as a user turn through the finetuning template of
tools/preprocess_instructions.py (the same ids): ``--template llama2`` (``[INST] … [/INST]``,
answers end at EOS) or ``llama3`` (LLaMA-3-instruct's headers, answers end at ``<|eot_id|>``).
Without ``--template`` it is llama3 for a tokenizer that has LLaMA-3's chat tokens, else llama2.
Without a prompt it keeps a conversation, one line a turn, until an empty line or end of input.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, metavar="DIR",
                   help="checkpoint: a megallama save folder (any TP/PP layout), an HF folder or a Meta folder")
    p.add_argument("--tokenizer-model", metavar="M",
                   help="SentencePiece model or Hugging Face tokenizer folder (default: the one stored with the checkpoint)")
    p.add_argument("--tokenizer-type", default=None,
                   choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"],
                   help="SentencePieceTokenizer (LLaMA, LLaMA-2) or HuggingFaceTokenizer (LLaMA-3: --tokenizer-model "
                        "is then the folder holding tokenizer.json); default: told by the tokenizer path (a folder "
                        "is a Hugging Face tokenizer)")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help="a prompt; repeat the flag for several (generated as one batch)")
    prompts.add_argument("--prompt-file", metavar="F", help="a text file with one prompt a line (one batch)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="tokens to generate per prompt at most (default 128)")
    p.add_argument("--greedy", action="store_true",
                   help="always take the most likely token (--top-p, --top-k and a --temperature other than 0 "
                        "must then be left out)")
    p.add_argument("--temperature", type=float, metavar="T",
                   help="sampling: divide the logits by T (default 0.8, as in Meta's example); 0 is greedy "
                        "decoding (the most likely token; --top-p and --top-k unused), as in Meta's reference "
                        "and vLLM")
    p.add_argument("--top-p", type=float, metavar="P",
                   help="sampling: keep the smallest set of tokens whose probability reaches P (default 0.95)")
    p.add_argument("--top-k", type=int, metavar="K", help="sampling: keep the K most likely tokens (default 0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    p.add_argument("--stop", action="append", metavar="STRING",
                   help="end a continuation where its text holds STRING, cut off there (as lm-eval's until, "
                        "vLLM's stop); repeat the flag for several; a newline in bash: --stop $'\\n'")
    p.add_argument("--chat", action="store_true",
                   help="apply the chat template (each prompt a user turn); with no prompt, chat interactively")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system prompt opening the conversation")
    p.add_argument("--template", choices=["llama2", "llama3"],
                   help="with --chat: the finetuning chat template, as given to tools/preprocess_instructions.py: "
                        "llama2 ([INST] ... [/INST], answers end at EOS) or llama3 (LLaMA-3-instruct's headers, "
                        "answers end at <|eot_id|>); default: llama3 when the tokenizer has the special tokens "
                        "<|start_header_id|>, <|end_header_id|> and <|eot_id|>, else llama2")
    return p


def _read_turn(rank0: bool) -> str:
    """A line from stdin on the first rank, the same line on every rank (TP under torchrun)."""
    import torch.distributed as dist

    line = [None]
    if rank0:
        try:
            line[0] = input("user> ").strip()
        except EOFError:
            line[0] = ""
    if dist.is_initialized():
        dist.broadcast_object_list(line, src=0)
    return line[0]


def fitted_new_tokens(model, max_new_tokens: int, prompt_length: int, rank0: bool) -> int:
    """``max_new_tokens`` shortened to fit after a prompt of ``prompt_length`` tokens (the longest),
    with a notice on stderr when it is; a ValueError when not one new token fits."""
    from megallama.inference.generation import fit_new_tokens

    positions = model.config.max_position_embeddings
    fitted = fit_new_tokens(positions, prompt_length, max_new_tokens)
    if fitted < max_new_tokens and rank0:
        print(f"notice: generating {fitted} tokens, not --max-new-tokens {max_new_tokens}: a prompt of "
              f"{prompt_length} tokens leaves {fitted} of the model's max_position_embeddings={positions}",
              file=sys.stderr, flush=True)
    return fitted


def chat(model, tokenizer, sampling, args, prompts, rank0: bool, template: str) -> None:
    """Answer ``prompts`` (each its own conversation), or an interactive conversation when None."""
    from megallama.data.instructions import encode_chat_prompt
    from megallama.inference.chat import chat_reply

    opening = [{"role": "system", "content": args.system}] if args.system else []

    def answer(messages) -> str:
        def on_text(text):
            if rank0:
                print(text, end="", flush=True)
        # encode_chat_prompt gives the ids chat_reply continues: fit them before anything is printed
        new_tokens = fitted_new_tokens(model, args.max_new_tokens,
                                       len(encode_chat_prompt(tokenizer, messages, template)), rank0)
        if rank0:
            print("assistant> ", end="", flush=True)
        reply = chat_reply(model, tokenizer, messages, template, new_tokens, sampling, on_text, args.stop or ())
        if rank0:
            print(flush=True)
        return reply

    if prompts is not None:
        for prompt in prompts:
            if rank0:
                print(f"user> {prompt}", flush=True)
            answer(opening + [{"role": "user", "content": prompt}])
        return
    messages = list(opening)
    while True:
        turn = _read_turn(rank0)
        if not turn:
            return
        messages.append({"role": "user", "content": turn})
        reply = answer(messages)
        messages.append({"role": "assistant", "content": reply.strip() or "(no answer)"})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # --temperature 0 is greedy decoding too, so it agrees with --greedy; any other sampling setting does not
    clashing = [flag for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p),
                                         ("--top-k", args.top_k))
                if value is not None and not (flag == "--temperature" and value == 0)]
    if args.greedy and clashing:
        hint = " (only --temperature 0, greedy too)" if "--temperature" in clashing else ""
        print(f"error: --greedy takes no {'/'.join(clashing)}{hint}", file=sys.stderr)
        return 2
    if args.max_new_tokens < 1:
        print(f"error: --max-new-tokens must be at least 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    if args.stop and not all(args.stop):
        print("error: --stop needs a non-empty string", file=sys.stderr)
        return 2
    if not (args.prompt or args.prompt_file or args.chat):
        print("error: give --prompt or --prompt-file (or --chat for an interactive chat)", file=sys.stderr)
        return 2
    for flag in ("system", "template"):
        if getattr(args, flag) and not args.chat:
            print(f"error: --{flag} goes with --chat", file=sys.stderr)
            return 2
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: cannot read --prompt-file {args.prompt_file}: {e}", file=sys.stderr)
            return 2
        if not prompts:
            print(f"error: {args.prompt_file} holds no prompt", file=sys.stderr)
            return 2
    else:
        prompts = args.prompt  # None with --chat alone: an interactive chat

    from megallama.checkpoint import load_matching_tokenizer, load_model
    from megallama.data.instructions import check_template_tokens
    from megallama.inference.chat import default_chat_template
    from megallama.inference.generation import SamplingParams, prepare_for_inference
    from megallama.inference.runtime import init_tensor_parallel_from_env, is_rank0, shutdown

    device = init_tensor_parallel_from_env()
    rank0 = is_rank0()
    try:
        sampling = SamplingParams(
            greedy=args.greedy, seed=args.seed,
            temperature=0.8 if args.temperature is None else args.temperature,
            top_p=0.95 if args.top_p is None else args.top_p, top_k=args.top_k or 0)
        model, reader = load_model(args.load, device=device)
        prepare_for_inference(model)
        tokenizer_model = args.tokenizer_model or reader.tokenizer_model()
        if tokenizer_model is None:
            raise ValueError(f"{args.load} holds no tokenizer (tokenizer.model or tokenizer.json): give --tokenizer-model")
        tokenizer = load_matching_tokenizer(model.config, tokenizer_model, args.tokenizer_type)
        template = None
        if args.chat:
            template = args.template or default_chat_template(tokenizer)
            check_template_tokens(tokenizer, template)
    except (OSError, KeyError, ValueError, RuntimeError) as e:  # RuntimeError: a damaged checkpoint (CheckpointError)
        print(f"error: {e}", file=sys.stderr)
        shutdown()
        return 1

    try:
        generate_all(args, model, tokenizer, sampling, prompts, rank0, template)
    except ValueError as e:  # a prompt (or conversation) that leaves no room for a new token
        if rank0:
            print(f"error: {e}; shorten the prompt", file=sys.stderr)
        shutdown()
        return 1
    shutdown()
    return 0


def generate_all(args, model, tokenizer, sampling, prompts, rank0: bool, template: str | None) -> None:
    """Generate for every prompt (or chat) and print the text as the flags ask."""
    from megallama.inference.text import generate_text_from_ids, prompt_ids

    if args.chat:
        chat(model, tokenizer, sampling, args, prompts, rank0, template)
        return
    ids = prompt_ids(tokenizer, prompts)
    new_tokens = fitted_new_tokens(model, args.max_new_tokens, max(map(len, ids)), rank0)
    stop = args.stop or ()
    if len(prompts) == 1:
        if rank0:
            print(prompts[0], end="", flush=True)

        def on_text(row, text):
            if rank0:
                print(text, end="", flush=True)
        generate_text_from_ids(model, tokenizer, ids, new_tokens, sampling, on_text, stop_strings=stop)
        if rank0:
            print()
    else:
        from tqdm import tqdm

        with tqdm(total=new_tokens, desc=f"generating {len(prompts)} prompts", unit="token",
                  disable=not rank0, file=sys.stderr) as bar:
            continuations = generate_text_from_ids(model, tokenizer, ids, new_tokens, sampling,
                                                   on_step=lambda step: bar.update(), stop_strings=stop)
        if rank0:
            for prompt, continuation in zip(prompts, continuations):
                print(prompt + continuation)
                print("-" * 40)


if __name__ == "__main__":
    sys.exit(main())
