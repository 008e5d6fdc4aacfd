"""The key/value cache ``LlamaModel.forward(..., cache=...)`` decodes with.

Each layer's rotated keys and values are preallocated ``[batch, kv_heads, max_len, head_dim]``
(this rank's key/value heads under tensor parallelism; fewer than the query heads under
grouped-query attention). A forward with the cache writes its positions' keys and
values after those already cached and attends over all of them, so no prefix is recomputed.

Prompts of different lengths are left-padded into one batch; ``key_padding`` marks the real
tokens and padded keys are masked out. Rotary embeddings encode relative positions only, so a row
shifted right by its padding scores its tokens as it would alone (up to float rounding).
"""
from __future__ import annotations

import torch


class LayerKVCache:
    """One layer's keys and values in a ``KVCache``: what its attention reads and writes."""

    def __init__(self, cache: KVCache, keys: torch.Tensor, values: torch.Tensor):
        self.cache, self.keys, self.values = cache, keys, values

    def new_slots(self, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Writable ``[batch, new_tokens, heads, head_dim]`` views of the key and value slots of
        the positions being run (the layout of the attention's projections)."""
        positions = slice(self.cache.length, self.cache.length + new_tokens)
        return self.keys[:, :, positions].transpose(1, 2), self.values[:, :, positions].transpose(1, 2)

    def filled(self, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[batch, heads, positions, head_dim]`` up to the last position being run."""
        end = self.cache.length + new_tokens
        return self.keys[:, :, :end], self.values[:, :, :end]

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self.cache.attention_mask


class KVCache:
    """Keys and values of every layer of ``model`` for ``batch_size`` rows of up to ``max_len``
    positions. ``key_padding`` ``[batch, max_len]``: True where a real token sits (None: no row
    is padded). ``length`` counts the positions cached so far; ``LlamaModel.forward`` runs the next
    ones and advances it."""

    def __init__(self, model, batch_size: int, max_len: int, key_padding: torch.Tensor | None = None):
        config = model.config
        if max_len > config.max_position_embeddings:
            raise ValueError(f"prompt plus new tokens need {max_len} positions but the model has "
                             f"max_position_embeddings={config.max_position_embeddings}")
        if key_padding is not None and key_padding.shape != (batch_size, max_len):
            raise ValueError(f"key_padding {tuple(key_padding.shape)} must be {(batch_size, max_len)}")
        like = next(model.parameters())
        self.layers = {}
        for layer_id, block in model.layers.items():
            shape = (batch_size, block.attention.kv_heads, max_len, config.head_dim)  # this rank's key/value heads
            self.layers[int(layer_id)] = LayerKVCache(self, like.new_empty(shape), like.new_empty(shape))
        self.batch_size, self.max_len, self.length = batch_size, max_len, 0
        self.key_padding = key_padding
        self.attention_mask: torch.Tensor | None = None  # of the forward in progress

    def begin(self, new_tokens: int, device: torch.device) -> None:
        """Ready the cache for a forward over ``new_tokens`` more positions (its attention mask)."""
        if self.length + new_tokens > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {self.length} are used and "
                             f"{new_tokens} more were given")
        self.attention_mask = self._attention_mask(self.length, new_tokens, device)

    def advance(self, new_tokens: int) -> None:
        """Count the positions a finished forward wrote."""
        self.length += new_tokens
        self.attention_mask = None

    def _attention_mask(self, start: int, length: int, device) -> torch.Tensor | None:
        """Boolean ``[batch or 1, 1, length, start + length]`` (True: attend) for queries at
        positions ``start…start+length-1``, or None where plain attention is exact: one query, or
        a causal block from position 0, without padding."""
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
