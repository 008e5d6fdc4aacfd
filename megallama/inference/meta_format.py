"""Meta's release format: ``params.json`` + ``consolidated.NN.pth``, one file per model-parallel rank.

Meta splits ``wq wk wv w1 w3`` and ``output`` along dim 0, ``wo w2`` and the embedding along dim 1,
and repeats the norms in every file. Its rotary embedding rotates interleaved pairs (0, 1), (2, 3)…
of each head, where megallama (like HF) rotates (i, i + head_dim/2); so the rows of each head of
``wq`` and ``wk`` are permuted on the way in and out. Attention scores, and so the logits, do not
change.
"""
from __future__ import annotations

import json
import math
import os
import re

import torch

from megallama.config import LlamaConfig
from megallama.inference.checkpoint_io import (CheckpointReader, atomic_write, copy_tokenizer, parameter_layout,
                                               progress_bar)

# Shards Meta ships per model size (hidden size → files): 7B 1, 13B 2, 33B 4, 65B 8.
META_SHARDS_BY_HIDDEN = {4096: 1, 5120: 2, 6656: 4, 8192: 8}
_SHARD_FILE = re.compile(r"consolidated\.(\d+)\.pth$")


def default_meta_shards(config: LlamaConfig) -> int:
    return META_SHARDS_BY_HIDDEN.get(config.hidden_size, 1)


def meta_parts(name: str) -> tuple[list[str], int | None]:
    """Meta tensors stacked (dim 0) into megallama parameter ``name``, and the dim Meta splits them
    along across its files (None: repeated in every file)."""
    if name == "tok_embeddings.weight":
        return [name], 1
    if name == "output.weight":
        return [name], 0
    if name == "norm.weight" or name.endswith(("attention_norm.weight", "ffn_norm.weight")):
        return [name], None
    module, rest, _ = name.rsplit(".", 2)  # layers.{i}.attention, wqkv, weight
    layer = module.rsplit(".", 1)[0]
    if rest == "wqkv":
        return [f"{layer}.attention.w{x}.weight" for x in "qkv"], 0
    if rest == "wo":
        return [f"{layer}.attention.wo.weight"], 1
    if rest == "w13":
        return [f"{layer}.feed_forward.w1.weight", f"{layer}.feed_forward.w3.weight"], 0
    if rest == "w2":
        return [f"{layer}.feed_forward.w2.weight"], 1
    raise KeyError(f"no Meta tensor corresponds to {name!r}")


def _rotary_permuted(name: str) -> bool:
    return name.endswith(("attention.wq.weight", "attention.wk.weight"))


def meta_to_rotate_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a Meta ``wq``/``wk`` (interleaved pairs per head) in rotate-half order."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rotate_half_to_meta(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`meta_to_rotate_half`."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_ffn_params(hidden_size: int, ffn_hidden_size: int) -> dict:
    """``params.json`` entries from which Meta's code derives ``ffn_hidden_size``: the largest
    ``multiple_of`` that does, else LLaMA-2's ``ffn_dim_multiplier``."""
    base = int(2 * 4 * hidden_size / 3)
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if multiple_of * math.ceil(base / multiple_of) == ffn_hidden_size:
            return {"multiple_of": multiple_of}
    # int(multiplier * base) lands in (0, ffn]; rounding up to a multiple of ffn gives ffn.
    return {"multiple_of": ffn_hidden_size, "ffn_dim_multiplier": ffn_hidden_size / base}


class MetaReader(CheckpointReader):
    format = "meta"

    def __init__(self, folder: str, max_position_embeddings: int = 2048):
        self.source = folder
        with open(os.path.join(folder, "params.json")) as f:
            params = json.load(f)
        numbered = sorted((int(m.group(1)), f) for f in os.listdir(folder) if (m := _SHARD_FILE.match(f)))
        if [i for i, _ in numbered] != list(range(len(numbered))):
            raise ValueError(f"{folder}: expected consolidated.00.pth … consolidated.{len(numbered) - 1:02d}.pth, "
                             f"found {[f for _, f in numbered]}")
        self.shards = [torch.load(os.path.join(folder, f), map_location="cpu", weights_only=True, mmap=True)
                       for _, f in numbered]
        kv_heads = params.get("n_kv_heads") or params["n_heads"]
        if kv_heads != params["n_heads"]:
            raise ValueError(f"{folder}: grouped-query attention (n_kv_heads={kv_heads}, n_heads={params['n_heads']}) "
                             "is not LLaMA-1")
        first = self.shards[0]
        for key in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
            if key not in first:
                raise KeyError(f"{folder}/consolidated.00.pth has no {key!r}")
        self.config = LlamaConfig(
            num_layers=params["n_layers"], hidden_size=params["dim"], num_attention_heads=params["n_heads"],
            # Meta derives these from params.json and the tokenizer; the tensors say them exactly.
            ffn_hidden_size=first["layers.0.feed_forward.w1.weight"].shape[0] * len(self.shards),
            vocab_size=first["tok_embeddings.weight"].shape[0],
            max_position_embeddings=max_position_embeddings, norm_epsilon=params["norm_eps"],
            rope_theta=float(params.get("rope_theta", 10000.0)))

    def _full(self, meta_name: str, dim: int | None) -> torch.Tensor:
        try:
            parts = [shard[meta_name] for shard in self.shards]
        except KeyError:
            raise KeyError(f"{self.source}: a consolidated.NN.pth file lacks {meta_name!r}") from None
        full = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim)
        if _rotary_permuted(meta_name):
            full = meta_to_rotate_half(full, self.config.num_attention_heads)
        return full

    def load(self, name: str) -> torch.Tensor:
        names, dim = meta_parts(name)
        parts = [self._full(n, dim) for n in names]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def dtype(self) -> torch.dtype:
        return self.shards[0]["norm.weight"].dtype

    def tokenizer_model(self) -> str | None:
        path = os.path.join(self.source, "tokenizer.model")
        return path if os.path.isfile(path) else None


def meta_params(config: LlamaConfig) -> dict:
    params = {"dim": config.hidden_size, "n_heads": config.num_attention_heads, "n_layers": config.num_layers,
              "norm_eps": config.norm_epsilon, "vocab_size": config.vocab_size,
              **meta_ffn_params(config.hidden_size, config.ffn_hidden_size)}
    if config.rope_theta != 10000.0:  # LLaMA-2/3 key; LLaMA-1's code knows no other theta
        params["rope_theta"] = config.rope_theta
    return params


def save_meta(reader: CheckpointReader, folder: str, num_shards: int, tokenizer_model: str | None = None,
              progress: bool = True) -> None:
    """Write ``num_shards`` ``consolidated.NN.pth`` files (one at a time) and ``params.json``."""
    config = reader.config
    layout = parameter_layout(config)
    if num_shards < 1:
        raise ValueError(f"the number of Meta shards must be >= 1, got {num_shards}")
    for name, info in layout.items():
        dim = meta_parts(name)[1]
        if dim is not None and info.shape[dim] // info.stack % num_shards:
            raise ValueError(f"cannot split {name} {info.shape} into {num_shards} Meta shards along dim {dim}")
    os.makedirs(folder, exist_ok=True)
    bar = progress_bar(num_shards * len(layout), progress, "writing Meta consolidated.NN.pth")
    for shard in range(num_shards):
        tensors = {}
        for name in layout:
            names, dim = meta_parts(name)
            for meta_name, part in zip(names, reader.load(name).chunk(len(names))):
                if _rotary_permuted(meta_name):
                    part = rotate_half_to_meta(part, config.num_attention_heads)
                if dim is not None:
                    part = part.chunk(num_shards, dim)[shard]
                tensors[meta_name] = part.clone()  # own storage: torch.save writes a view's whole storage
            bar.update()
        atomic_write(os.path.join(folder, f"consolidated.{shard:02d}.pth"), lambda tmp: torch.save(tensors, tmp))
        del tensors
    bar.close()

    def write_params(tmp):
        with open(tmp, "w") as f:
            json.dump(meta_params(config), f)
    atomic_write(os.path.join(folder, "params.json"), write_params)
    copy_tokenizer(tokenizer_model, folder)
