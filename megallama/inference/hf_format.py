"""Hugging Face format: ``config.json`` + safetensors shards (+ index), what
``transformers.AutoModelForCausalLM.from_pretrained`` loads as a ``LlamaForCausalLM``.

HF's LLaMA uses the rotate-half rotary layout, as megallama does, so weights only change names
(and q/k/v, gate/up are split out of megallama's fused projections).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from megallama.config import LlamaConfig
from megallama.inference.checkpoint_io import (CheckpointReader, atomic_write, copy_tokenizer, parameter_layout,
                                               progress_bar)
from megallama.model import megallama_to_hf_state_dict

INDEX_FILENAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3  # HF's default shard size


def hf_names(name: str, config: LlamaConfig) -> list[str]:
    """HF tensors making up megallama parameter ``name``, in the order they are stacked (dim 0)."""
    shape = parameter_layout_cached(config)[name].shape
    return list(megallama_to_hf_state_dict({name: torch.empty(shape, device="meta")}, config))


_LAYOUTS: dict = {}


def parameter_layout_cached(config: LlamaConfig):
    key = repr(config)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = parameter_layout(config)
    return _LAYOUTS[key]


class HFReader(CheckpointReader):
    format = "hf"

    def __init__(self, folder: str):
        from safetensors import safe_open
        from transformers import AutoConfig

        self.source = folder
        hf_config = AutoConfig.from_pretrained(folder)
        if hf_config.model_type != "llama":
            raise ValueError(f"{folder}/config.json is a {hf_config.model_type!r} model, not 'llama'")
        self.config = LlamaConfig.from_hf(hf_config)
        index = os.path.join(folder, INDEX_FILENAME)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        self._handles, self._where = [], {}
        for filename in files:
            handle = safe_open(os.path.join(folder, filename), framework="pt")
            self._handles.append(handle)
            for key in handle.keys():
                self._where[key] = handle
        missing = [n for name in self.names() for n in hf_names(name, self.config) if n not in self._where]
        if missing:
            raise KeyError(f"{folder} lacks HF tensors {missing[:5]}{' …' if len(missing) > 5 else ''}")

    def load(self, name: str) -> torch.Tensor:
        parts = [self._where[n].get_tensor(n) for n in hf_names(name, self.config)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def dtype(self) -> torch.dtype:
        return self.load("norm.weight").dtype

    def tokenizer_model(self) -> str | None:
        path = os.path.join(self.source, "tokenizer.model")
        return path if os.path.isfile(path) else None


def _plan_shards(reader: CheckpointReader, max_shard_bytes: int) -> list[list[str]]:
    """Megallama names grouped into files of at most ``max_shard_bytes`` (one parameter that is
    larger gets a file of its own); a fused parameter's HF parts stay in one file."""
    element = torch.empty((), dtype=reader.dtype).element_size()
    shards, size = [[]], 0
    for name, info in parameter_layout_cached(reader.config).items():
        nbytes = element
        for s in info.shape:
            nbytes *= s
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_hf(reader: CheckpointReader, folder: str, tokenizer_model: str | None = None, progress: bool = True,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write ``reader``'s checkpoint as an HF folder, one safetensors file at a time."""
    from safetensors.torch import save_file

    config = reader.config
    shards = _plan_shards(reader, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    os.makedirs(folder, exist_ok=True)
    bar = progress_bar(sum(len(s) for s in shards), progress, "writing HF safetensors")
    for filename, shard in zip(names, shards):
        tensors = {}
        for name in shard:
            split = megallama_to_hf_state_dict({name: reader.load(name)}, config)
            for hf_name, t in split.items():
                tensors[hf_name] = t.contiguous().clone()  # safetensors refuses views of one storage
                weight_map[hf_name] = filename
                total += t.numel() * t.element_size()
            bar.update()
        atomic_write(os.path.join(folder, filename),
                     lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        del tensors
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_text(os.path.join(folder, INDEX_FILENAME), json.dumps(index, indent=2))
    _write_config(config, reader.dtype, folder, tokenizer_model)
    if tokenizer_model is not None:
        copy_tokenizer(tokenizer_model, folder)
        _write_hf_tokenizer(tokenizer_model, folder)


def _write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def _write_config(config: LlamaConfig, dtype: torch.dtype, folder: str, tokenizer_model: str | None) -> None:
    hf_config = config.to_hf()
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.dtype = dtype
    if tokenizer_model is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
        hf_config.bos_token_id, hf_config.eos_token_id = sp.bos_id(), sp.eos_id()
    _write_text(os.path.join(folder, "config.json"), hf_config.to_json_string())


def _write_hf_tokenizer(tokenizer_model: str, folder: str) -> None:
    """HF tokenizer files converted by transformers from the SentencePiece model (BOS prepended,
    as LLaMA's tokenizer does), with the finetuning template as ``chat_template``, so that
    ``apply_chat_template`` gives the ids ``tools/preprocess_instructions.py`` writes."""
    from transformers import LlamaTokenizer

    from megallama.data.instructions import CHAT_TEMPLATES

    with tempfile.TemporaryDirectory(dir=folder, prefix=".tokenizer.") as staging:
        shutil.copyfile(tokenizer_model, os.path.join(staging, "tokenizer.model"))
        tokenizer = LlamaTokenizer.from_pretrained(staging, add_bos_token=True, add_eos_token=False)
        tokenizer.chat_template = CHAT_TEMPLATES["llama2"]
        out = os.path.join(staging, "out")
        tokenizer.save_pretrained(out)
        for filename in os.listdir(out):
            if filename != "tokenizer.model":
                os.replace(os.path.join(out, filename), os.path.join(folder, filename))
