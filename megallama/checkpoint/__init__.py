"""Checkpoints of any format read as one stream of full tensors, and written back in any format.

Every reader (HF folder, Meta ``consolidated.NN.pth``, megallama ``SAVE/iter_NNNNNNN``) presents a
checkpoint the same way: a ``LlamaConfig`` and the full (unsharded) tensors under the serial
model's parameter names, rotate-half rotary layout, loaded one at a time on request. Writers pull
tensors one by one from a reader, so a conversion never holds much more than the part of the model
being written (one output file, or one rank's shard) — not the whole model, let alone two copies.

Each format registers itself in ``REGISTRY`` (``base.CheckpointFormat``); detection tries them in
order. ``storage`` is megallama's on-disk layout that training saves to, ``sharded`` the model and
optimizer pieces a training rank saves and loads.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from megallama.checkpoint import hf, meta, native
from megallama.checkpoint.base import CheckpointFormat, CheckpointReader, is_hf_tokenizer, load_matching_tokenizer
from megallama.model import LlamaModel
from megallama.parallel import shard_like

# Detection order: a megallama save folder may also hold a tokenizer or other files.
REGISTRY: dict[str, CheckpointFormat] = {f.name: f for f in (native.FORMAT, hf.FORMAT, meta.FORMAT)}
FORMATS = tuple(REGISTRY)


def _format(name: str, what: str) -> CheckpointFormat:
    if name not in REGISTRY:
        raise ValueError(f"unknown {what} format {name!r}; choose one of {', '.join(FORMATS)}")
    return REGISTRY[name]


def detect_format(path: str) -> str:
    """The name of the registered format whose files ``path`` holds."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is a file, not a checkpoint folder (a megallama save folder, an HF folder or a "
                         "Meta folder)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path} does not exist")
    files = set(os.listdir(path))
    for fmt in REGISTRY.values():
        if fmt.detect(files):
            return fmt.name
    expected = [f"{fmt.looks_for} ({fmt.name})" for fmt in REGISTRY.values()]
    raise ValueError(f"cannot tell the format of {path}: expected {', '.join(expected[:-1])} or {expected[-1]}; "
                     "found " + (", ".join(sorted(files)[:10]) or "an empty folder"))


def open_checkpoint(path: str, source_format: str | None = None) -> CheckpointReader:
    """A reader over the checkpoint at ``path`` (format detected unless given)."""
    return _format(source_format or detect_format(path), "checkpoint").reader(path)


def convert_checkpoint(load: str, save: str, target_format: str, source_format: str | None = None,
                       target_tensor_parallel_size: int | None = None,
                       target_pipeline_parallel_size: int | None = None,
                       tokenizer_model: str | None = None, progress: bool = True) -> str:
    """Convert ``load`` into ``save`` in ``target_format``; returns the source format.

    Sizes: ``megallama`` is written for TP × PP ranks (default 1 × 1); ``meta`` as that many
    ``consolidated.NN.pth`` files as TP says (default: as Meta ships the paper's sizes); ``hf``
    takes no sizes. ``tokenizer_model`` (a SentencePiece model or a Hugging Face tokenizer folder) is stored
    beside the weights (HF: a SentencePiece model also as HF tokenizer files); one with more tokens
    than the model's vocabulary is refused (its export would not run).
    """
    target = _format(target_format, "target")
    reader = open_checkpoint(load, source_format)
    if os.path.abspath(load) == os.path.abspath(save):
        raise ValueError(f"--save must differ from --load ({save}): conversion reads while it writes")
    tokenizer_model = tokenizer_model or reader.tokenizer_model()
    if tokenizer_model is not None and not (os.path.isfile(tokenizer_model) or is_hf_tokenizer(tokenizer_model)):
        raise FileNotFoundError(f"tokenizer model {tokenizer_model} does not exist (a SentencePiece model file or "
                                "a Hugging Face tokenizer folder with tokenizer.json)")
    if tokenizer_model is not None:
        load_matching_tokenizer(reader.config, tokenizer_model)
    target.writer(reader, save, target_tensor_parallel_size, target_pipeline_parallel_size, tokenizer_model,
                  progress)
    return reader.format


@torch.no_grad()
def load_model(path: str, source_format: str | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu") -> tuple[LlamaModel, CheckpointReader]:
    """A whole model in eval mode (every layer; this rank's shard of each tensor under tensor
    parallelism) with the checkpoint's weights, copied tensor by tensor; ``dtype`` defaults to the
    stored one. For fast decoding pass it through ``megallama.inference.prepare_for_inference``."""
    reader = open_checkpoint(path, source_format)
    config = dataclasses.replace(reader.config, sequence_parallel=False, recompute_granularity=None,
                                 params_dtype=dtype or reader.dtype)
    with torch.device("meta"):
        model = LlamaModel(config)
    _materialize(model, device)
    for name, param in model.named_parameters():
        param.copy_(shard_like(param, reader.load(name)))
    return model.eval(), reader


def _materialize(model: torch.nn.Module, device) -> None:
    """Give a meta-device model real (uninitialised) storage, keeping each parameter's
    tensor-parallel attributes (``Module.to_empty`` would drop them)."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                real = torch.nn.Parameter(torch.empty_like(param, device=device), requires_grad=param.requires_grad)
                real.__dict__.update(param.__dict__)
                module._parameters[name] = real
