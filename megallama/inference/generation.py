"""Text generation with a key/value cache: prefill the prompts once, then one token a step.

The network is the model's own forward: ``model(ids, cache=cache, logits_to_keep=1)`` runs new
positions after the cached ones (``megallama.kv_cache``); tests hold it equal to the forward
without a cache. This module pads the prompts, samples, stops, and keeps the ranks in step.

Prompts of different lengths are left-padded into one batch; the cache masks the padded keys.

Under tensor parallelism (TP > 1) the model sums and gathers over the ranks as in training; the
chosen tokens are broadcast from the first TP rank so that every rank continues with the same ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from megallama.kv_cache import KVCache
from megallama.parallel import state as parallel_state

__all__ = ["SamplingParams", "KVCache", "fit_new_tokens", "generate", "prepare_for_inference", "sample_next_token"]


def prepare_for_inference(model):
    """``model.prepare_for_inference()``: weights laid out for fast decoding, eval mode; returns
    the model. Only for a model that no longer trains."""
    return model.prepare_for_inference()


@dataclass
class SamplingParams:
    """How the next token is chosen: ``greedy`` (argmax), or sampling from the softmax of the
    logits divided by ``temperature``, restricted to the ``top_k`` most likely tokens (0: all) and
    to the smallest set whose probability reaches ``top_p`` (1.0: all). ``temperature`` 0 is greedy
    decoding, as in Meta's reference ``generate`` and vLLM (``top_k`` and ``top_p`` then unused).
    ``seed`` None draws the seed from torch's default generator (``torch.manual_seed`` fixes it)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not self.greedy and self.temperature == 0:
            self.greedy = True
        if not self.greedy:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be >= 0 (0: greedy decoding), got {self.temperature}")
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


def fit_new_tokens(max_positions: int, prompt_length: int, max_new_tokens: int) -> int:
    """How many of ``max_new_tokens`` fit after a prompt of ``prompt_length`` tokens (the longest
    of a batch) in ``max_positions``: Meta's reference shortens the generation to fit,
    ``total_len = min(max_seq_len, max_gen_len + max_prompt_len)``. A prompt that leaves no room
    for one new token is a ValueError."""
    if prompt_length >= max_positions:
        raise ValueError(f"a prompt of {prompt_length} tokens leaves no room for a new token: the model has "
                         f"max_position_embeddings={max_positions}")
    return min(max_new_tokens, max_positions - prompt_length)


def _check_inference_model(model) -> None:
    if not (getattr(model, "pre_process", True) and getattr(model, "post_process", True)):
        raise ValueError("generation needs the whole model on each rank (pipeline_model_parallel_size 1)")
    if len(model.layers) != model.config.num_layers:
        raise ValueError(f"generation needs all {model.config.num_layers} layers, the model holds {len(model.layers)}")
    if model.config.sequence_parallel:
        raise ValueError("generation runs without sequence parallelism: build the model with sequence_parallel=False")


def _last_logits(model, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    """Logits [batch, vocab] (float32) of the last position of ``input_ids``."""
    return model(input_ids, cache=cache, logits_to_keep=1)[:, -1].float()


def sample_next_token(logits: torch.Tensor, params: SamplingParams,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of ``logits`` [batch, vocab] → ``[batch]`` (int64)."""
    if params.greedy:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the more likely ones already reach top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _broadcast_from_first_tp_rank(tokens: torch.Tensor) -> torch.Tensor:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.broadcast(tokens, parallel_state.get_tensor_model_parallel_src_rank(),
                       group=parallel_state.get_tensor_model_parallel_group())
    return tokens


def _uncached_last_logits(model, sequences: list[list[int]], device) -> torch.Tensor:
    """Reference path: the forward without a cache over each whole sequence (rows of equal length
    in one batch), logits of the last position."""
    out = [None] * len(sequences)
    by_length: dict[int, list[int]] = {}
    for row, seq in enumerate(sequences):
        by_length.setdefault(len(seq), []).append(row)
    for rows in by_length.values():
        ids = torch.tensor([sequences[r] for r in rows], dtype=torch.long, device=device)
        logits = _last_logits(model, ids)
        for i, r in enumerate(rows):
            out[r] = logits[i]
    return torch.stack(out)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingParams | None = None, eos_id: int | None = None, pad_id: int = 0,
             use_cache: bool = True,
             on_tokens: Callable[[int, torch.Tensor, torch.Tensor], Iterable[int] | None] | None = None,
             stop_ids: Sequence[int] = (), vocab_size: int | None = None) -> list[list[int]]:
    """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens; returns the new tokens
    of each row, stopping after ``eos_id`` or any of ``stop_ids`` (e.g. a chat template's end of
    turn), which is not returned.

    ``vocab_size`` (the tokenizer's) keeps the choice to ids below it: a vocabulary padded for
    tensor parallelism (``--make-vocab-size-divisible-by``) has embedding rows no token decodes to.

    ``on_tokens(step, tokens, finished)`` is called after every step with the tokens just chosen
    ([batch]) and which rows had already finished before them (for streaming output); it may return
    rows that end with this token (e.g. their text now holds a stop string; the token is returned).
    A prompt plus ``max_new_tokens`` beyond the model's positions is a ValueError
    (:func:`fit_new_tokens` says how many fit).
    ``use_cache=False`` recomputes every prefix without a cache (the reference the cache is tested
    against). Under TP every rank must call this with the same arguments.
    """
    _check_inference_model(model)
    sampling = sampling or SamplingParams()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (prepend BOS to an empty prompt)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    model.eval()
    device = next(model.parameters()).device
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    total = longest + max_new_tokens
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=device)
        # Not torch.seed(): that reseeds the default generator, undoing a caller's torch.manual_seed.
        generator.manual_seed(sampling.seed if sampling.seed is not None else int(torch.randint(2 ** 62, ())))

    if use_cache:
        padded = torch.full((batch, longest), pad_id, dtype=torch.long, device=device)
        key_padding = None
        if any(len(p) != longest for p in prompts):
            key_padding = torch.ones(batch, total, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            padded[row, longest - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            if key_padding is not None:
                key_padding[row, :longest - len(p)] = False
        cache = KVCache(model, batch, total, key_padding)
        logits = _last_logits(model, padded, cache)
    else:
        if total > model.config.max_position_embeddings:
            raise ValueError(f"prompt plus new tokens need {total} positions but the model has "
                             f"max_position_embeddings={model.config.max_position_embeddings}")
        sequences = [list(p) for p in prompts]
        logits = _uncached_last_logits(model, sequences, device)

    stops = set(stop_ids) | ({eos_id} if eos_id is not None else set())
    finished = [False] * batch  # Python bools: a step's bookkeeping costs no tensor ops
    outputs: list[list[int]] = [[] for _ in range(batch)]
    for step in range(max_new_tokens):
        if vocab_size is not None and vocab_size < logits.shape[-1]:
            logits[:, vocab_size:] = float("-inf")
        tokens = _broadcast_from_first_tp_rank(sample_next_token(logits, sampling, generator))
        ended = on_tokens(step, tokens, torch.tensor(finished, device=device)) if on_tokens is not None else None
        for row, token in enumerate(tokens.tolist()):
            if finished[row]:
                continue
            if token in stops:
                finished[row] = True
            else:
                outputs[row].append(token)
        for row in ended or ():
            finished[row] = True
        if all(finished) or step == max_new_tokens - 1:
            break
        if use_cache:
            logits = _last_logits(model, tokens[:, None], cache)
        else:
            for row, token in enumerate(tokens.tolist()):
                sequences[row].append(token)
            logits = _uncached_last_logits(model, sequences, device)
    return outputs
