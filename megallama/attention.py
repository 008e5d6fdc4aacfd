"""Causal attention within documents of a packed sequence (Megatron's ``--reset-attention-mask``).

A packed row holds several examples back to back; ``position_ids`` restart at 0 where each one
begins, and a token attends only to earlier tokens of its own example. Two paths, same result:

* CPU: one causal ``scaled_dot_product_attention`` per example. Measured here (8 heads × 64,
  fwd+bwd, chat-length examples, median of 10 alternating runs, 1 thread): 14 ms against 30 ms for
  one SDPA call with a block-diagonal boolean mask at seq 512 (5 examples), 264 ms against 1157 ms
  at seq 2048 (16 examples); with 2 threads 403 ms against 797 ms at 2048. The per-example calls
  compute only Σ nᵢ² / 2 scores instead of s² / 2 and build no s × s mask.
* CUDA: FlexAttention with a block mask made from per-block document ranges (128 × 128 blocks,
  built from the document ids of each block's first and last token, never an s × s tensor);
  ``flex_attention`` is compiled once, so blocks outside every example are skipped.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from megallama import host_checks

FLEX_BLOCK = 128


class DocumentLayout:
    """The documents of each row of a packed batch, read off ``position_ids`` [b, s] (0 starts a
    document). Built once per forward and shared by all layers."""

    def __init__(self, position_ids: torch.Tensor):
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [batch, seq], got {tuple(position_ids.shape)}")
        # On a device the trainer checked the host copy: reading the ids here would stall the step.
        if host_checks.readable_without_sync(position_ids) and bool((position_ids[:, 0] != 0).any()):
            raise ValueError("position_ids must start every row with 0 (the start of its first document)")
        self.position_ids = position_ids
        self.document_ids = (position_ids == 0).cumsum(-1)
        self._spans = None
        self._block_mask = None

    def spans(self) -> list[list[tuple[int, int]]]:
        """[(start, end)] of each row's documents."""
        if self._spans is None:
            s = self.position_ids.shape[1]
            starts = (self.position_ids == 0).cpu()
            self._spans = []
            for row in starts:
                edges = row.nonzero().flatten().tolist() + [s]
                self._spans.append(list(zip(edges[:-1], edges[1:])))
        return self._spans

    def block_mask(self, block: int = FLEX_BLOCK):
        """FlexAttention ``BlockMask``: causal within documents, from block-level document ranges."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import BlockMask

            docs = self.document_ids
            b, s = docs.shape
            n = -(-s // block)
            first = docs[:, ::block]                                          # [b, n]
            last = docs[:, torch.clamp(torch.arange(1, n + 1, device=docs.device) * block, max=s) - 1]
            q_first, q_last = first[:, :, None], last[:, :, None]
            k_first, k_last = first[:, None, :], last[:, None, :]
            causal = torch.ones(n, n, dtype=torch.bool, device=docs.device).tril()
            touches = (k_first <= q_last) & (k_last >= q_first) & causal      # some pair may attend
            full = touches & (q_first == q_last) & (k_first == k_last) & (q_first == k_first) \
                & torch.ones(n, n, dtype=torch.bool, device=docs.device).tril(-1)
            partial = touches & ~full

            def indices(m):
                order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
                return m.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

            def mask_mod(batch, head, q_idx, kv_idx):
                return (docs[batch, q_idx] == docs[batch, kv_idx]) & (q_idx >= kv_idx)

            num, idx = indices(partial)
            full_num, full_idx = indices(full)
            self._block_mask = BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block,
                                                        mask_mod=mask_mod, seq_lengths=(s, s))
        return self._block_mask


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    """Compiled once per process; the block mask, an argument, changes from batch to batch."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_document_attention(q, k, v, layout: DocumentLayout, compiled: bool = True):
    """FlexAttention over ``layout``'s documents; ``compiled=False`` runs the eager reference
    (slow, for checking the block mask on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = _compiled_flex_attention() if compiled else flex_attention
    return fn(q, k, v, block_mask=layout.block_mask(), enable_gqa=_grouped(q, k))


def per_document_attention(q, k, v, layout: DocumentLayout):
    """One causal SDPA call per document; the output has q's [b, h, s, d] shape laid out as
    [b, s, h, d] in memory (as SDPA's own output), so the caller's transpose/reshape is free."""
    b, h, s, d = q.shape
    out = torch.empty(b, s, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    for row, spans in enumerate(layout.spans()):
        for start, end in spans:
            part = slice(start, end)
            out[row, :, part] = F.scaled_dot_product_attention(
                q[row:row + 1, :, part], k[row:row + 1, :, part], v[row:row + 1, :, part], is_causal=True,
                enable_gqa=_grouped(q, k))[0]
    return out


def _grouped(q, k) -> bool:
    """Grouped-query attention: fewer key/value heads than query heads, each serving a group."""
    return k.shape[1] != q.shape[1]


def causal_attention(q, k, v, layout: DocumentLayout | None = None):
    """Causal attention of q [b, heads, s, d] and k, v [b, kv_heads, s, d] (kv_heads divides heads:
    grouped-query attention); within documents when ``layout`` is given."""
    if layout is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=_grouped(q, k))
    if q.is_cuda:
        return flex_document_attention(q, k, v, layout)
    return per_document_attention(q, k, v, layout)
