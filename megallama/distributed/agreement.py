"""Do all ranks run one configuration? Each rank parses its own flags and reads its own files, so a
rank launched with another ``--lr`` or ``--seed`` (a per-node launch script, an environment variable
in the command line, another tokenizer on one node) would train a diverging data-parallel replica
without a word, and one with another ``--train-iters`` or ``--seq-length`` would crash its peers in
a collective with no hint of the cause. Hashes of every setting are compared (tensors, no pickles)."""
from __future__ import annotations

import hashlib
import json
from typing import Optional

import torch
import torch.distributed as dist


def _settings(run_config: dict) -> list[tuple[str, str]]:
    """``(section.field, JSON value)`` of a two-level config dict, in its order (the same on every rank
    running the same code, whatever the values: a nested value such as a rope scaling is one setting)."""
    out = []
    for section, fields in run_config.items():
        items = fields.items() if isinstance(fields, dict) else [(None, fields)]
        out += [(section if name is None else f"{section}.{name}", json.dumps(value, sort_keys=True, default=str))
                for name, value in items]
    return out


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def first_disagreement(run_config: dict) -> Optional[str]:
    """None when every rank holds the same ``run_config`` (``PretrainConfig.to_dict()``), else one line
    naming the settings that differ (up to four), this rank's values and the ranks that differ from it.
    Collective over the world group: every rank calls it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    settings = _settings(run_config)
    names = _digest(json.dumps([name for name, _ in settings]))  # first column: the same code?
    mine = torch.tensor([names] + [_digest(f"{n}={v}") for n, v in settings], dtype=torch.int64, device=device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([mine.numel()], dtype=torch.int64, device=device))
    if len({int(s) for s in sizes}) == 1:
        table = [torch.empty_like(mine) for _ in sizes]
        dist.all_gather(table, mine)
        table = torch.stack(table).cpu()
    if len({int(s) for s in sizes}) > 1 or bool((table[:, 0] != table[0, 0]).any()):
        return "the ranks run configurations with other settings: launch every rank with the same megallama"
    columns = [int(c) for c in (table != table[0]).any(dim=0).nonzero().flatten()]
    if not columns:
        return None
    me = dist.get_rank()
    others = [r for r, row in enumerate(table) if bool((row[columns] != table[me, columns]).any())]
    shown = ", ".join(f"{settings[c - 1][0]} {settings[c - 1][1]}" for c in columns[:4])
    return (f"the ranks were launched with different settings: {shown}{', …' if len(columns) > 4 else ''} on "
            f"this rank differ on rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}; give every "
            "rank the same flags and the same files")
