"""Text in, text out: tokenize prompts, generate, decode incrementally for streaming output, end
at stop strings."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from megallama.inference.generation import SamplingParams, generate


def first_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Where ``text`` is cut: the start of the earliest of ``stop_strings`` in it (None: nowhere),
    as lm-eval cuts at its ``until`` strings and vLLM at its ``stop``."""
    found = [at for stop in stop_strings if (at := text.find(stop)) >= 0]
    return min(found, default=None)


class IncrementalDecoder:
    """Turns a growing list of new token ids into the text added since the last call.

    Decoding the prompt together with the continuation keeps SentencePiece's word-initial spaces;
    text ending in an incomplete UTF-8 sequence (byte-fallback pieces) is held back until the
    character is complete. With ``stop_strings`` the continuation ends before the first of them
    (``stopped`` turns True), and the last ``len(longest) - 1`` characters are held back, since
    they may begin one: streamed text never runs past a stop string.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop_strings: Sequence[str] = ()):
        self.tokenizer, self.prompt_ids = tokenizer, list(prompt_ids)
        if any(not stop for stop in stop_strings):
            raise ValueError("a stop string must not be empty")
        self.stop_strings = list(stop_strings)
        self.hold = max(map(len, self.stop_strings), default=1) - 1
        self.prefix = tokenizer.decode(self.prompt_ids)
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        text = self._decoded()
        cut = first_stop(text, self.stop_strings)
        if cut is not None:
            self.stopped = True
            text = text[:cut]
        elif text.endswith("\ufffd"):
            return ""
        else:
            text = text[:max(0, len(text) - self.hold)]
        if not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    def _decoded(self) -> str:
        full = self.tokenizer.decode(self.prompt_ids + self.ids)
        return full[len(self.prefix):] if full.startswith(self.prefix) else self.tokenizer.decode(self.ids)

    def text(self) -> str:
        """The whole continuation, up to the first stop string."""
        text = self._decoded()
        cut = first_stop(text, self.stop_strings)
        return text if cut is None else text[:cut]

    def flush(self) -> str:
        """What :meth:`add` held back (an incomplete character, a tail that could have begun a stop
        string), once generation ended."""
        text = self.text()
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta


def prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """The ids :func:`generate_text` continues: BOS, then each prompt's tokens."""
    return [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]


def generate_text(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                  sampling: SamplingParams | None = None,
                  on_text: Callable[[int, str], None] | None = None,
                  on_step: Callable[[int], None] | None = None,
                  stop_strings: Sequence[str] = ()) -> list[str]:
    """Continuations of ``prompts`` (BOS prepended, stopping at the tokenizer's EOS, or before the
    first of ``stop_strings`` in the text, which is cut there).

    ``on_text(row, new_text)`` receives each row's text as it is generated; ``on_step(step)`` is
    called once per generated position.
    """
    return generate_text_from_ids(model, tokenizer, prompt_ids(tokenizer, prompts), max_new_tokens, sampling,
                                  on_text, on_step, stop_strings=stop_strings)


def generate_text_from_ids(model, tokenizer, ids: Sequence[Sequence[int]], max_new_tokens: int,
                           sampling: SamplingParams | None = None,
                           on_text: Callable[[int, str], None] | None = None,
                           on_step: Callable[[int], None] | None = None,
                           stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = ()) -> list[str]:
    """:func:`generate_text` for prompts already tokenized (e.g. a chat through its template);
    a row also stops at any of ``stop_ids`` (not part of its text)."""
    stops = {tokenizer.eos_id, *stop_ids}
    decoders = [IncrementalDecoder(tokenizer, p, stop_strings) for p in ids]

    def on_tokens(step: int, tokens: torch.Tensor, finished: torch.Tensor) -> list[int]:
        if on_step is not None:
            on_step(step)
        ended = []
        for row, (token, done) in enumerate(zip(tokens.tolist(), finished.tolist())):
            if done or token in stops:
                continue
            delta = decoders[row].add(token)
            if delta and on_text is not None:
                on_text(row, delta)
            if decoders[row].stopped:
                ended.append(row)
        return ended

    generate(model, ids, max_new_tokens, sampling, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
             on_tokens=on_tokens, stop_ids=stop_ids, vocab_size=tokenizer.vocab_size)
    for row, decoder in enumerate(decoders):
        rest = decoder.flush()
        if rest and on_text is not None:
            on_text(row, rest)
    return [d.text() for d in decoders]
