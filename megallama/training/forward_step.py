"""The LLaMA forward step the pipeline schedules call (see :mod:`megallama.pipeline.schedules`).

Here rather than in the pipeline package, which knows no model.
"""
from typing import NamedTuple, Optional

import torch


class MicroBatch(NamedTuple):
    """One micro-batch as the data iterators yield it; packed or document-reset data add the
    last two (a tuple of two or four tensors unpacks into it)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None


def llama_forward_step(data_iterator, chunk, input_tensor):
    """Runs the next micro-batch through one LLaMA chunk (DDP-wrapped or not); the loss function
    sums the per-token losses, over ``loss_mask`` when there is one."""
    batch = MicroBatch(*next(data_iterator))
    model = getattr(chunk, "module", chunk)
    out = model(input_ids=batch.tokens if model.pre_process else None,
                labels=batch.labels if model.post_process else None, hidden_states=input_tensor,
                position_ids=batch.position_ids)
    loss_mask = batch.loss_mask
    if loss_mask is None:
        return out, lambda per_token: (per_token.sum(), per_token.numel())
    return out, lambda per_token: ((per_token * loss_mask).sum(), loss_mask.sum())
