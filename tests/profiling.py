"""Measuring what autograd keeps for backward."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_activation_bytes(fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of distinct storages autograd saves while ``fn()`` runs, less those of ``exclude``
    (pass the parameters: weights are kept anyway). Tensors sharing storage are counted once."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in excluded:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())
