"""Chat generation: a conversation through the finetuning template, answered up to its stop token.

The prompt ids are :func:`megallama.data.instructions.encode_chat_prompt`'s, the ids finetuning
trained on up to the assistant's turn. An answer ends where the template ends an assistant turn:
at the tokenizer's EOS for ``llama2``, at ``<|eot_id|>`` (or EOS) for ``llama3``; the stop token is
not part of the reply.
"""
from __future__ import annotations

from typing import Callable, Sequence

from megallama.data.instructions import CHAT_TEMPLATES, default_chat_template, encode_chat_prompt, special_token_id
from megallama.inference.generation import SamplingParams
from megallama.inference.text import generate_text_from_ids

__all__ = ["CHAT_TEMPLATES", "chat_reply", "chat_stop_ids", "default_chat_template"]


def chat_stop_ids(tokenizer, template: str) -> list[int]:
    """The token ids that end an assistant turn under ``template``."""
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(CHAT_TEMPLATES)}")
    if template == "llama3":
        eot = special_token_id(tokenizer, "<|eot_id|>")
        return [eot] if eot == tokenizer.eos_id else [eot, tokenizer.eos_id]
    return [tokenizer.eos_id]


def chat_reply(model, tokenizer, messages: Sequence[dict], template: str, max_new_tokens: int,
               sampling: SamplingParams | None = None,
               on_text: Callable[[str], None] | None = None, stop_strings: Sequence[str] = ()) -> str:
    """The assistant's answer to ``messages`` (system first, then user and assistant alternating,
    ending with a user turn), streamed to ``on_text(new_text)`` as it is generated; it also ends
    before the first of ``stop_strings``."""
    ids = encode_chat_prompt(tokenizer, list(messages), template)
    stream = None if on_text is None else (lambda row, text: on_text(text))
    return generate_text_from_ids(model, tokenizer, [ids], max_new_tokens, sampling, stream,
                                  stop_ids=chat_stop_ids(tokenizer, template), stop_strings=stop_strings)[0]
