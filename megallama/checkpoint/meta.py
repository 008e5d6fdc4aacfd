"""Meta's release format: ``params.json`` + ``consolidated.NN.pth``, one file per model-parallel rank.

Which Meta tensors make up each parameter, the dimension its files split them along, and which
have Meta's rotary row order are in the model's parameter table. Meta's rotary embedding rotates
interleaved pairs (0, 1), (2, 3)… of each head, where megallama (like HF) rotates
(i, i + head_dim/2); so the rows of each head of ``wq`` and ``wk`` are permuted on the way in and
out. Attention scores, and so the logits, do not change.
"""
from __future__ import annotations

import json
import os
import re

import torch

from megallama.checkpoint.base import (
    CheckpointFormat,
    CheckpointReader,
    atomic_write,
    copy_tokenizer,
    progress_bar,
    stored_tokenizer,
)
from megallama.checkpoint.storage import load_weights_only
from megallama.config import LlamaConfig, RopeScaling, llama_ffn_hidden_size

# The params.json entries the reader needs; Meta's LLaMA-1/2/3 files all hold them.
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "norm_eps")
# Shards Meta ships per model size (hidden size → files): 7B 1, 13B 2, 33B 4, 65B 8.
META_SHARDS_BY_HIDDEN = {4096: 1, 5120: 2, 6656: 4, 8192: 8}
_SHARD_FILE = re.compile(r"consolidated\.(\d+)\.pth$")


def default_meta_shards(config: LlamaConfig) -> int:
    return META_SHARDS_BY_HIDDEN.get(config.hidden_size, 1)


def meta_to_rotate_half(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a Meta ``wq``/``wk`` (interleaved pairs within each head) in rotate-half order."""
    rows, cols = w.shape
    return w.view(rows // head_dim, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rotate_half_to_meta(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`meta_to_rotate_half`."""
    rows, cols = w.shape
    return w.view(rows // head_dim, 2, head_dim // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_ffn_params(hidden_size: int, ffn_hidden_size: int) -> dict:
    """``params.json`` entries from which Meta's code (:func:`llama_ffn_hidden_size`) derives
    ``ffn_hidden_size``: the largest ``multiple_of`` up to 256 that does alone, else one with a multiplier
    LLaMA-2/3 ship (1.3, 1.5), else the exact ratio as ``ffn_dim_multiplier``."""
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if llama_ffn_hidden_size(hidden_size, multiple_of) == ffn_hidden_size:
            return {"multiple_of": multiple_of}
    for multiple_of in (256, 1024, 4096):
        for multiplier in (1.3, 1.5):
            if llama_ffn_hidden_size(hidden_size, multiple_of, multiplier) == ffn_hidden_size:
                return {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
    # int(multiplier * base) lands in (0, ffn]; rounding up to a multiple of ffn gives ffn.
    return {"multiple_of": ffn_hidden_size, "ffn_dim_multiplier": ffn_hidden_size / int(2 * 4 * hidden_size / 3)}


def read_params(path: str) -> dict:
    """``params.json``; one that is not JSON, not an object or lacks an entry the reader needs is
    a ValueError naming the file (not a bare parse error or KeyError)."""
    try:
        with open(path, encoding="utf-8") as f:
            params = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path} holds a JSON {type(params).__name__}, not an object of model parameters")
    missing = [key for key in REQUIRED_PARAMS if key not in params]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)} (Meta's params.json holds {', '.join(REQUIRED_PARAMS)})")
    return params


class MetaReader(CheckpointReader):
    format = "meta"

    def __init__(self, folder: str, max_position_embeddings: int = 2048):
        self.source = folder
        params = read_params(os.path.join(folder, "params.json"))
        numbered = sorted((int(m.group(1)), f) for f in os.listdir(folder) if (m := _SHARD_FILE.match(f)))
        if [i for i, _ in numbered] != list(range(len(numbered))):
            raise ValueError(f"{folder}: expected consolidated.00.pth … consolidated.{len(numbered) - 1:02d}.pth, "
                             f"found {[f for _, f in numbered]}")
        # A damaged or foreign shard is a one-line ValueError naming it, as a megallama rank file is.
        self.shards = [load_weights_only(os.path.join(folder, f)) for _, f in numbered]
        first = self.shards[0]
        for key in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
            if key not in first:
                raise ValueError(f"{folder}/consolidated.00.pth has no {key!r}")
        self.config = LlamaConfig(
            num_layers=params["n_layers"], hidden_size=params["dim"], num_attention_heads=params["n_heads"],
            num_query_groups=params.get("n_kv_heads"),
            # Meta derives these from params.json and the tokenizer; the tensors say them exactly.
            ffn_hidden_size=first["layers.0.feed_forward.w1.weight"].shape[0] * len(self.shards),
            vocab_size=first["tok_embeddings.weight"].shape[0],
            max_position_embeddings=max_position_embeddings, norm_epsilon=params["norm_eps"],
            rope_theta=float(params.get("rope_theta", 10000.0)),
            # Meta's llama3 code scales by its fixed LLaMA-3.1 constants whenever use_scaled_rope is set.
            rope_scaling=RopeScaling() if params.get("use_scaled_rope") else None,
            # params.json has no tying key; a checkpoint without a head shares the embedding.
            tie_word_embeddings="output.weight" not in first)

    def _full(self, meta_name: str, dim: int | None, rotary: bool) -> torch.Tensor:
        try:
            parts = [shard[meta_name] for shard in self.shards]
        except KeyError:
            raise ValueError(f"{self.source}: a consolidated.NN.pth file lacks {meta_name!r}") from None
        full = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim)
        return meta_to_rotate_half(full, self.config.head_dim) if rotary else full

    def load(self, name: str) -> torch.Tensor:
        spec = self.table[name]
        parts = [self._full(n, spec.meta_split_dim, rotary) for n, rotary in zip(spec.meta, spec.meta_rotary)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def dtype(self) -> torch.dtype:
        return self.shards[0]["norm.weight"].dtype

    def tokenizer_model(self) -> str | None:
        return stored_tokenizer(self.source)


def meta_params(config: LlamaConfig) -> dict:
    """``params.json``; refuses what Meta's code cannot read back: a head size other than
    dim / n_heads, a rope scaling other than its fixed LLaMA-3.1 one."""
    if config.kv_channels * config.num_attention_heads != config.hidden_size:
        raise ValueError(f"Meta's params.json has no head size: kv_channels ({config.kv_channels}) must be "
                         f"hidden_size / num_attention_heads ({config.hidden_size} / {config.num_attention_heads})")
    if config.rope_scaling not in (None, RopeScaling()):
        raise ValueError(f"Meta's params.json can say only use_scaled_rope, which Meta's code reads as "
                         f"{RopeScaling()}; cannot write {config.rope_scaling}")
    params = {"dim": config.hidden_size, "n_heads": config.num_attention_heads, "n_layers": config.num_layers,
              "norm_eps": config.norm_epsilon, "vocab_size": config.vocab_size,
              **meta_ffn_params(config.hidden_size, config.ffn_hidden_size)}
    if config.num_query_groups != config.num_attention_heads:  # LLaMA-2/3 keys from here on
        params["n_kv_heads"] = config.num_query_groups
    if config.rope_theta != 10000.0:  # LLaMA-1's code knows no other theta
        params["rope_theta"] = config.rope_theta
    if config.rope_scaling is not None:
        params["use_scaled_rope"] = True
    return params


def save_meta(reader: CheckpointReader, folder: str, num_shards: int, tokenizer_model: str | None = None,
              progress: bool = True) -> None:
    """Write ``num_shards`` ``consolidated.NN.pth`` files (one at a time) and ``params.json``."""
    config, table = reader.config, reader.table
    if num_shards < 1:
        raise ValueError(f"the number of Meta shards must be >= 1, got {num_shards}")
    for name, spec in table.items():
        dim = spec.meta_split_dim
        sizes = spec.parts if dim == 0 else (spec.shape[dim],) if dim is not None else ()
        if any(size % num_shards for size in sizes):
            raise ValueError(f"cannot split {name} {spec.shape} into {num_shards} Meta shards along dim {dim}")
    os.makedirs(folder, exist_ok=True)
    bar = progress_bar(num_shards * len(table), progress, "writing Meta consolidated.NN.pth")
    for shard in range(num_shards):
        tensors = {}
        for name, spec in table.items():
            dim = spec.meta_split_dim
            for meta_name, rotary, part in zip(spec.meta, spec.meta_rotary, reader.load(name).split(spec.parts)):
                if rotary:
                    part = rotate_half_to_meta(part, config.head_dim)
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


def _write(reader: CheckpointReader, folder: str, tensor_parallel_size: int | None,
           pipeline_parallel_size: int | None, tokenizer_model: str | None, progress: bool) -> None:
    if pipeline_parallel_size not in (None, 1):
        raise ValueError("--target-pipeline-parallel-size applies to the megallama format only, not meta")
    save_meta(reader, folder, tensor_parallel_size or default_meta_shards(reader.config),
              tokenizer_model=tokenizer_model, progress=progress)


FORMAT = CheckpointFormat(
    name="meta", looks_for="params.json + consolidated.NN.pth",
    detect=lambda files: "params.json" in files and any(f.startswith("consolidated.") and f.endswith(".pth")
                                                     for f in files),
    reader=MetaReader, writer=_write)
