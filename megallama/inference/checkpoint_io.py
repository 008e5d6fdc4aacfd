"""Checkpoints of any format read as one stream of full tensors, and written back in any format.

Every reader (HF folder, Meta ``consolidated.NN.pth``, megallama ``SAVE/iter_NNNNNNN``) presents a
checkpoint the same way: a ``LlamaConfig`` and the full (unsharded) tensors under the serial
model's parameter names, rotate-half rotary layout, loaded one at a time on request. Writers pull
tensors one by one from a reader, so a conversion never holds much more than the part of the model
being written (one output file, or one rank's shard) — not the whole model, let alone two copies.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch

from megallama.config import LlamaConfig
from megallama.fileio import atomic_path
from megallama.model import LlamaModel
from megallama.parallel import shard_like

FORMATS = ("megallama", "hf", "meta")


class CheckpointReader:
    """Full tensors of one checkpoint under megallama's parameter names (subclasses say how)."""

    config: LlamaConfig
    source: str

    def load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in."""
        raise NotImplementedError

    def names(self) -> list[str]:
        return list(parameter_layout(self.config))

    def tokenizer_model(self) -> str | None:
        """A SentencePiece model stored with the checkpoint, if any."""
        return None


class ParameterInfo:
    """Shape of a full parameter and how tensor parallelism splits it (dim None: replicated;
    ``stack`` fused blocks each split separately)."""

    __slots__ = ("shape", "dim", "stack")

    def __init__(self, shape: tuple, dim: int | None, stack: int):
        self.shape, self.dim, self.stack = shape, dim, stack


def parameter_layout(config: LlamaConfig) -> dict[str, ParameterInfo]:
    """The serial model's parameters in model order (embedding, layer by layer, norm, head), read
    off a model built on the meta device (no memory, no initialisation cost)."""
    with torch.device("meta"):
        model = LlamaModel(config)
    layout = {}
    for name, p in model.named_parameters():
        split = getattr(p, "tensor_model_parallel", False)
        shape = tuple(getattr(p, "full_shape", None) or p.shape)
        layout[name] = ParameterInfo(shape, p.partition_dim % len(shape) if split else None,
                                     p.partition_stack if split else 1)
    return layout


def detect_format(path: str) -> str:
    """``hf`` (config.json + safetensors), ``meta`` (params.json + consolidated.NN.pth) or
    ``megallama`` (a save folder with latest_checkpointed_iteration.txt, or an iter_NNNNNNN folder)."""
    from megallama.training import checkpointing

    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    files = set(os.listdir(path))
    if checkpointing.TRACKER_FILENAME in files or checkpointing.METADATA_FILENAME in files:
        return "megallama"
    if "params.json" in files and any(f.startswith("consolidated.") and f.endswith(".pth") for f in files):
        return "meta"
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return "hf"
    raise ValueError(f"cannot tell the format of {path}: expected {checkpointing.TRACKER_FILENAME} (megallama), "
                     "params.json + consolidated.NN.pth (meta) or config.json + *.safetensors (hf); "
                     "found " + (", ".join(sorted(files)[:10]) or "an empty folder"))


def open_checkpoint(path: str, source_format: str | None = None) -> CheckpointReader:
    """A reader over the checkpoint at ``path`` (format detected unless given)."""
    fmt = source_format or detect_format(path)
    if fmt == "hf":
        from megallama.inference.hf_format import HFReader
        return HFReader(path)
    if fmt == "meta":
        from megallama.inference.meta_format import MetaReader
        return MetaReader(path)
    if fmt == "megallama":
        from megallama.inference.megallama_format import MegallamaReader
        return MegallamaReader(path)
    raise ValueError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")


def convert_checkpoint(load: str, save: str, target_format: str, source_format: str | None = None,
                       target_tensor_parallel_size: int | None = None,
                       target_pipeline_parallel_size: int | None = None,
                       tokenizer_model: str | None = None, progress: bool = True) -> str:
    """Convert ``load`` into ``save`` in ``target_format``; returns the source format.

    Sizes: ``megallama`` is written for TP × PP ranks (default 1 × 1); ``meta`` as that many
    ``consolidated.NN.pth`` files as TP says (default: as Meta ships the paper's sizes); ``hf``
    takes no sizes. ``tokenizer_model`` is stored beside the weights (HF: also as HF tokenizer files).
    """
    if target_format not in FORMATS:
        raise ValueError(f"unknown target format {target_format!r}; choose one of {', '.join(FORMATS)}")
    reader = open_checkpoint(load, source_format)
    if os.path.abspath(load) == os.path.abspath(save):
        raise ValueError(f"--save must differ from --load ({save}): conversion reads while it writes")
    if target_format != "megallama" and target_pipeline_parallel_size not in (None, 1):
        raise ValueError(f"--target-pipeline-parallel-size applies to the megallama format only, not {target_format}")
    if target_format == "hf" and target_tensor_parallel_size not in (None, 1):
        raise ValueError("an HF checkpoint is not split: --target-tensor-parallel-size applies to megallama and meta")
    tokenizer_model = tokenizer_model or reader.tokenizer_model()
    if tokenizer_model is not None and not os.path.isfile(tokenizer_model):
        raise FileNotFoundError(f"tokenizer model {tokenizer_model} does not exist")
    os.makedirs(save, exist_ok=True)
    if target_format == "hf":
        from megallama.inference.hf_format import save_hf
        save_hf(reader, save, tokenizer_model=tokenizer_model, progress=progress)
    elif target_format == "meta":
        from megallama.inference.meta_format import default_meta_shards, save_meta
        shards = target_tensor_parallel_size or default_meta_shards(reader.config)
        save_meta(reader, save, shards, tokenizer_model=tokenizer_model, progress=progress)
    else:
        from megallama.inference.megallama_format import save_megallama
        save_megallama(reader, save, target_tensor_parallel_size or 1, target_pipeline_parallel_size or 1,
                       tokenizer_model=tokenizer_model, progress=progress)
    return getattr(reader, "format", source_format)


@torch.no_grad()
def load_model(path: str, source_format: str | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu") -> tuple[LlamaModel, CheckpointReader]:
    """A whole model for inference (every layer; this rank's shard of each tensor under tensor
    parallelism) with the checkpoint's weights, copied tensor by tensor; ``dtype`` defaults to the
    stored one. See ``prepare_for_inference`` for the weights' memory layout."""
    reader = open_checkpoint(path, source_format)
    config = dataclasses.replace(reader.config, sequence_parallel=False, recompute_granularity=None,
                                 params_dtype=dtype or reader.dtype)
    with torch.device("meta"):
        model = LlamaModel(config)
    _materialize(model, device)
    for name, param in model.named_parameters():
        param.copy_(shard_like(param, reader.load(name)))
    from megallama.inference.generation import prepare_for_inference

    return prepare_for_inference(model), reader


def _materialize(model: torch.nn.Module, device) -> None:
    """Give a meta-device model real (uninitialised) storage, keeping each parameter's
    tensor-parallel attributes (``Module.to_empty`` would drop them)."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                real = torch.nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                real.__dict__.update(param.__dict__)
                module._parameters[name] = real


def progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it to ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


def copy_tokenizer(tokenizer_model: str | None, folder: str) -> None:
    """Store the SentencePiece model as ``folder/tokenizer.model`` (Meta's and HF's name)."""
    if tokenizer_model is None:
        return
    target = os.path.join(folder, "tokenizer.model")
    if os.path.abspath(tokenizer_model) == os.path.abspath(target):
        return
    with open(tokenizer_model, "rb") as f:
        data = f.read()

    def write(tmp):
        with open(tmp, "wb") as out:
            out.write(data)
    atomic_write(target, write)
