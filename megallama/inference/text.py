"""Text in, text out: tokenize prompts, generate, decode incrementally for streaming output."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from megallama.inference.generation import SamplingParams, generate


class IncrementalDecoder:
    """Turns a growing list of new token ids into the text added since the last call.

    Decoding the prompt together with the continuation keeps SentencePiece's word-initial spaces;
    text ending in an incomplete UTF-8 sequence (byte-fallback pieces) is held back until the
    character is complete.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int]):
        self.tokenizer, self.prompt_ids = tokenizer, list(prompt_ids)
        self.prefix = tokenizer.decode(self.prompt_ids)
        self.ids: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.prompt_ids + self.ids)
        text = text[len(self.prefix):] if text.startswith(self.prefix) else self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    def text(self) -> str:
        """The whole continuation."""
        full = self.tokenizer.decode(self.prompt_ids + self.ids)
        return full[len(self.prefix):] if full.startswith(self.prefix) else self.tokenizer.decode(self.ids)

    def flush(self) -> str:
        """What :meth:`add` held back (an incomplete character at the end), once generation ended."""
        text = self.text()
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta


def generate_text(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                  sampling: SamplingParams | None = None,
                  on_text: Callable[[int, str], None] | None = None,
                  on_step: Callable[[int], None] | None = None) -> list[str]:
    """Continuations of ``prompts`` (BOS prepended, stopping at the tokenizer's EOS).

    ``on_text(row, new_text)`` receives each row's text as it is generated; ``on_step(step)`` is
    called once per generated position.
    """
    ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
    return generate_text_from_ids(model, tokenizer, ids, max_new_tokens, sampling, on_text, on_step)


def generate_text_from_ids(model, tokenizer, ids: Sequence[Sequence[int]], max_new_tokens: int,
                           sampling: SamplingParams | None = None,
                           on_text: Callable[[int, str], None] | None = None,
                           on_step: Callable[[int], None] | None = None,
                           stop_ids: Sequence[int] = ()) -> list[str]:
    """:func:`generate_text` for prompts already tokenized (e.g. a chat through its template);
    a row also stops at any of ``stop_ids`` (not part of its text)."""
    stops = {tokenizer.eos_id, *stop_ids}
    decoders = [IncrementalDecoder(tokenizer, p) for p in ids]

    def on_tokens(step: int, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        if on_step is not None:
            on_step(step)
        for row, (token, done) in enumerate(zip(tokens.tolist(), finished.tolist())):
            if done or token in stops:
                continue
            delta = decoders[row].add(token)
            if delta and on_text is not None:
                on_text(row, delta)

    generate(model, ids, max_new_tokens, sampling, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
             on_tokens=on_tokens, stop_ids=stop_ids)
    for row, decoder in enumerate(decoders):
        rest = decoder.flush()
        if rest and on_text is not None:
            on_text(row, rest)
    return [d.text() for d in decoders]
