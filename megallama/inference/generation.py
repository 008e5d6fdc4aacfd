"""Text generation with a key/value cache: prefill the prompts once, then one token a step.

The cached forward runs the model's own weights through the fused kernels (RMSNorm, rotary,
SwiGLU) without autograd; only attention differs from training: each layer writes its rotated keys
and values into a preallocated cache and the new queries attend over everything cached so far. No
prefix is ever recomputed. Tests hold it equal to the model's training forward.

Prompts of different lengths are left-padded into one batch. Padded key positions are masked out;
rotary embeddings encode relative positions only, so a row shifted right by its padding scores its
tokens exactly as it would alone (up to float rounding).

Under tensor parallelism (TP > 1) each rank holds its heads' share of the cache; the row-parallel
projections sum the ranks' parts as in training, the logits are gathered, and the chosen tokens
are broadcast from the first TP rank so that every rank continues with the same ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megallama import ops
from megallama.parallel import state as parallel_state
from megallama.parallel.layers import gather_tensor

__all__ = ["SamplingParams", "KVCache", "cached_forward", "generate", "prepare_for_inference", "sample_next_token"]

# Matrix-multiply weights (``x @ W.T``); the embedding table is gathered from, not multiplied.
_PROJECTIONS = ("attention.wqkv.weight", "attention.wo.weight", "feed_forward.w13.weight",
                "feed_forward.w2.weight", "output.weight")


@torch.no_grad()
def prepare_for_inference(model):
    """Store the projection weights column-major (same shape and values, transposed memory), in
    place, and switch to eval mode; returns the model.

    ``F.linear`` then runs ``x @ W.T`` as a plain product of row-major matrices, which MKL does
    several times faster for the one-row products of decoding on CPU (the output head most of all)
    and as fast for prefill. On CPU it also keeps a oneDNN-packed copy of the output head
    (vocabulary × hidden floats more memory). Only for a model that no longer trains: its optimizer
    would see the parameters' storage change.
    """
    for name, param in model.named_parameters():
        if name.endswith(_PROJECTIONS) and param.device.type == "cpu" and param.dim() == 2:
            param.data = param.data.t().contiguous().t()
    model._packed_output = _pack_for_onednn(model.output.weight)
    return model.eval()


def _pack_for_onednn(weight: torch.Tensor):
    """The output head's weight reordered for oneDNN's matrix multiply (a copy), or None where
    torch has no oneDNN. With several rows (batched decoding) MKL's sgemm runs this wide, flat
    product at a fraction of oneDNN's speed on some CPUs (3× slower on the AMD EPYC here)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (AttributeError, RuntimeError):  # an op of torch's own, absent from some builds
        return None
    # the weight's version counter tells whether it changed since (then the copy is stale)
    return packed, weight, weight._version


@dataclass
class SamplingParams:
    """How the next token is chosen: ``greedy`` (argmax), or sampling from the softmax of the
    logits divided by ``temperature``, restricted to the ``top_k`` most likely tokens (0: all) and
    to the smallest set whose probability reaches ``top_p`` (1.0: all)."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not self.greedy:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


class KVCache:
    """Rotated keys and values of every layer, preallocated ``[batch, heads, max_len, head_dim]``
    (this rank's heads under TP), plus which cached positions are real tokens (not padding)."""

    def __init__(self, model, batch_size: int, max_len: int, key_padding: torch.Tensor | None = None):
        config = model.config
        if max_len > config.max_position_embeddings:
            raise ValueError(f"prompt plus new tokens need {max_len} positions but the model has "
                             f"max_position_embeddings={config.max_position_embeddings}")
        self.max_len, self.length = max_len, 0
        self.keys, self.values = {}, {}
        for layer_id, block in model.layers.items():
            weight = block.attention.wqkv.weight
            heads = weight.shape[0] // (3 * config.head_dim)
            shape = (batch_size, heads, max_len, config.head_dim)
            self.keys[layer_id] = torch.empty(shape, dtype=weight.dtype, device=weight.device)
            self.values[layer_id] = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        # [batch, max_len] True where a real token sits; None when no row is padded.
        self.key_padding = key_padding

    def attention_mask(self, start: int, length: int, device) -> torch.Tensor | None:
        """Boolean ``[batch, 1, length, start + length]`` (True: attend) for queries at positions
        ``start…start+length-1``, or None where plain attention is exact: one query, or a
        causal block from position 0, without padding."""
        end = start + length
        if self.key_padding is None and (length == 1 or start == 0):
            return None
        positions = torch.arange(end, device=device)
        query_positions = positions[start:, None]
        allowed = positions[None, :] <= query_positions  # causal
        if self.key_padding is not None:
            allowed = allowed & self.key_padding[:, None, :end]
            # A padding query would otherwise see no key at all (a NaN row that poisons the next
            # layer's cached values); let it see itself. No real query ever attends to it.
            allowed = allowed | (positions[None, :] == query_positions)
        return allowed[:, None] if allowed.dim() == 3 else allowed[None, None]


# The decoding forward calls the model's weights through the raw kernels: one token a step is a
# few microseconds of arithmetic per op, so autograd-Function bookkeeping would cost more than the
# work. The cache test checks it against the model's own forward.

def _tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    return ops.rms_norm_forward(x, norm.weight, norm.eps)[0]


def _row_parallel(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` summed over the TP ranks (a row-parallel projection's forward)."""
    y = F.linear(x, weight)
    if _tp_size() > 1:
        dist.all_reduce(y, group=parallel_state.get_tensor_model_parallel_group())
    return y


def _cached_attention(attention, xn, cos, sin, cache: KVCache, layer_id: str) -> torch.Tensor:
    head_dim = cache.keys[layer_id].shape[-1]
    b, s, _ = xn.shape
    start, end = cache.length, cache.length + s
    qkv = F.linear(xn, attention.wqkv.weight).view(b, s, 3, -1, head_dim)  # this rank's heads
    keys, values = cache.keys[layer_id], cache.values[layer_id]
    # Rotated keys go straight into the cache; the [b, s, heads, d] views of the cache slices
    # are what the kernel and the copy write through.
    ops.rope_forward(qkv[:, :, 1], cos, sin, out=keys[:, :, start:end].transpose(1, 2))
    values[:, :, start:end].transpose(1, 2).copy_(qkv[:, :, 2])
    q = ops.rope_forward(qkv[:, :, 0], cos, sin).transpose(1, 2)  # [b, heads, s, d]
    keys, values = keys[:, :, :end], values[:, :, :end]
    mask = cache.attention_mask(start, s, xn.device)
    if s == 1:
        # One query per row: two small matrix products. CPU SDPA kernels are tuned for long query
        # blocks and cost many times more here.
        scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(head_dim ** -0.5)
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), values)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None)
    return _row_parallel(out.transpose(1, 2).reshape(b, s, -1), attention.wo.weight)


def _feed_forward(ff, xn: torch.Tensor) -> torch.Tensor:
    return _row_parallel(ops.swiglu_forward(F.linear(xn, ff.w13.weight)), ff.w2.weight)


def _check_inference_model(model) -> None:
    if not (getattr(model, "pre_process", True) and getattr(model, "post_process", True)):
        raise ValueError("generation needs the whole model on each rank (pipeline_model_parallel_size 1)")
    if len(model.layers) != model.config.num_layers:
        raise ValueError(f"generation needs all {model.config.num_layers} layers, the model holds {len(model.layers)}")
    if model.config.sequence_parallel:
        raise ValueError("generation runs without sequence parallelism: build the model with sequence_parallel=False")


def full_logits(model, h: torch.Tensor) -> torch.Tensor:
    """Logits over the whole vocabulary for final hidden states ``h`` (gathered under TP)."""
    hn = _norm(model.norm, h)
    packed = getattr(model, "_packed_output", None)
    if packed is not None and packed[1] is model.output.weight and packed[2] == packed[1]._version:
        logits = torch.ops.mkldnn._linear_pointwise(hn, packed[0], None, "none", [], "")
    else:
        logits = F.linear(hn, model.output.weight)
    if _tp_size() > 1:
        logits = gather_tensor(logits, -1, full_size=model.config.vocab_size)
    return logits


@torch.no_grad()
def cached_forward(model, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run ``input_ids`` [batch, s] at positions ``cache.length…`` through the model, extend the
    cache, and return the logits of the last position [batch, vocab] in float32."""
    if cache.length + input_ids.shape[1] > cache.max_len:
        raise ValueError(f"the cache holds {cache.max_len} positions; {cache.length} are used and "
                         f"{input_ids.shape[1]} more were given")
    if _tp_size() > 1:
        h = model.tok_embeddings(input_ids)  # vocab-parallel lookup and sum
    else:
        h = F.embedding(input_ids, model.tok_embeddings.weight)
    cos, sin = model.rotary(input_ids.shape[1], h.device, offset=cache.length)
    for layer_id, block in model.layers.items():
        h = h + _cached_attention(block.attention, _norm(block.attention_norm, h), cos, sin, cache, layer_id)
        h = h + _feed_forward(block.feed_forward, _norm(block.ffn_norm, h))
    cache.length += input_ids.shape[1]
    return full_logits(model, h[:, -1]).float()


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
    """Reference path: the training forward over each whole sequence (rows of equal length in one
    batch), logits of the last position."""
    out = [None] * len(sequences)
    by_length: dict[int, list[int]] = {}
    for row, seq in enumerate(sequences):
        by_length.setdefault(len(seq), []).append(row)
    for rows in by_length.values():
        ids = torch.tensor([sequences[r] for r in rows], dtype=torch.long, device=device)
        logits = model(ids)[:, -1].float()
        for i, r in enumerate(rows):
            out[r] = logits[i]
    return torch.stack(out)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: SamplingParams | None = None, eos_id: int | None = None, pad_id: int = 0,
             use_cache: bool = True,
             on_tokens: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> list[list[int]]:
    """Continue each prompt (token ids) by up to ``max_new_tokens`` tokens; returns the new tokens
    of each row, stopping after ``eos_id`` (which is not returned).

    ``on_tokens(step, tokens, finished)`` is called after every step with the tokens just chosen
    ([batch]) and which rows had already finished before them (for streaming output).
    ``use_cache=False`` recomputes every prefix with the training forward (the reference the cache
    is tested against). Under TP every rank must call this with the same arguments.
    """
    _check_inference_model(model)
    sampling = sampling or SamplingParams()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (prepend BOS to an empty prompt)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    model.eval()
    device = model.output.weight.device
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    total = longest + max_new_tokens
    generator = None
    if not sampling.greedy:
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())

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
        logits = cached_forward(model, padded, cache)
    else:
        if total > model.config.max_position_embeddings:
            raise ValueError(f"prompt plus new tokens need {total} positions but the model has "
                             f"max_position_embeddings={model.config.max_position_embeddings}")
        sequences = [list(p) for p in prompts]
        logits = _uncached_last_logits(model, sequences, device)

    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    for step in range(max_new_tokens):
        tokens = _broadcast_from_first_tp_rank(sample_next_token(logits, sampling, generator))
        if on_tokens is not None:
            on_tokens(step, tokens, finished.clone())
        for row, token in enumerate(tokens.tolist()):
            if not finished[row] and token != eos_id:
                outputs[row].append(token)
        if eos_id is not None:
            finished |= tokens == eos_id
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if use_cache:
            logits = cached_forward(model, tokens[:, None], cache)
        else:
            for row, token in enumerate(tokens.tolist()):
                sequences[row].append(token)
            logits = _uncached_last_logits(model, sequences, device)
    return outputs
