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

from megallama.checkpoint.base import (
    CheckpointFormat,
    CheckpointReader,
    atomic_write,
    copy_tokenizer,
    is_hf_tokenizer,
    progress_bar,
    stored_tokenizer,
)
from megallama.config import LlamaConfig

INDEX_FILENAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3  # HF's default shard size


class HFReader(CheckpointReader):
    format = "hf"

    def __init__(self, folder: str):
        from safetensors import SafetensorError, safe_open
        from transformers import AutoConfig

        self.source = folder
        try:
            hf_config = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as error:  # transformers' OSError for a config.json that is not JSON
            raise ValueError(f"{folder}/config.json is unreadable ({error})") from None
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
            try:
                handle = safe_open(os.path.join(folder, filename), framework="pt")
            except (SafetensorError, OSError) as error:  # a truncated or damaged file: one line naming it
                raise ValueError(f"{folder}/{filename} is unreadable ({error})") from None
            self._handles.append(handle)
            for key in handle.keys():
                self._where[key] = handle
        missing = [n for spec in self.table.values() for n in spec.hf if n not in self._where]
        if missing:
            raise ValueError(f"{folder} lacks HF tensors {missing[:5]}{' …' if len(missing) > 5 else ''}")

    def load(self, name: str) -> torch.Tensor:
        parts = [self._where[n].get_tensor(n) for n in self.table[name].hf]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def dtype(self) -> torch.dtype:
        return self.load("norm.weight").dtype

    def tokenizer_model(self) -> str | None:
        return stored_tokenizer(self.source)


def _plan_shards(reader: CheckpointReader, max_shard_bytes: int) -> list[list[str]]:
    """Megallama names grouped into files of at most ``max_shard_bytes`` (one parameter that is
    larger gets a file of its own); a fused parameter's HF parts stay in one file."""
    element = torch.empty((), dtype=reader.dtype).element_size()
    shards, size = [[]], 0
    for name, spec in reader.table.items():
        nbytes = element
        for s in spec.shape:
            nbytes *= s
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def save_hf(reader: CheckpointReader, folder: str, tokenizer_model: str | None = None, progress: bool = True,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write ``reader``'s checkpoint as an HF folder, one safetensors file at a time. The tokenizer
    goes along: a Hugging Face tokenizer folder's files as they are, a SentencePiece model also
    converted to HF tokenizer files."""
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
            for hf_name, t in zip(reader.table[name].hf, reader.load(name).split(reader.table[name].parts)):
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
    copy_tokenizer(tokenizer_model, folder)
    if tokenizer_model is not None and not is_hf_tokenizer(tokenizer_model):
        _write_hf_tokenizer(tokenizer_model, folder)
    elif tokenizer_model is not None:
        _add_llama3_chat_template(folder)


def _write(reader: CheckpointReader, folder: str, tensor_parallel_size: int | None,
           pipeline_parallel_size: int | None, tokenizer_model: str | None, progress: bool) -> None:
    if tensor_parallel_size not in (None, 1) or pipeline_parallel_size not in (None, 1):
        raise ValueError("an HF checkpoint is not split: --target-tensor-parallel-size applies to megallama and "
                         "meta, --target-pipeline-parallel-size to megallama")
    save_hf(reader, folder, tokenizer_model=tokenizer_model, progress=progress)


FORMAT = CheckpointFormat(
    name="hf", looks_for="config.json + *.safetensors",
    detect=lambda files: "config.json" in files and any(f.endswith(".safetensors") for f in files),
    reader=HFReader, writer=_write)


def _write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def _write_config(config: LlamaConfig, dtype: torch.dtype, folder: str, tokenizer_model: str | None) -> None:
    hf_config = config.to_hf()
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.dtype = dtype
    if tokenizer_model is not None and is_hf_tokenizer(tokenizer_model):
        from megallama.tokenizer import HuggingFaceTokenizer

        tokenizer = HuggingFaceTokenizer(tokenizer_model)
        hf_config.bos_token_id, hf_config.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
    elif tokenizer_model is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
        hf_config.bos_token_id, hf_config.eos_token_id = sp.bos_id(), sp.eos_id()
    _write_text(os.path.join(folder, "config.json"), hf_config.to_json_string())


def _add_llama3_chat_template(folder: str) -> None:
    """A copied HF tokenizer folder without a chat template whose tokenizer holds LLaMA-3's chat
    tokens (a base model's) gets the ``llama3`` template ``--template llama3`` finetunes with, so that
    ``apply_chat_template`` on the export gives the ids finetuning trained on. A template the folder
    has (an instruct model's own) is kept."""
    from megallama.data.instructions import CHAT_TEMPLATES, default_chat_template
    from megallama.tokenizer import HuggingFaceTokenizer

    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path) or os.path.isfile(os.path.join(folder, "chat_template.jinja")):
        return
    with open(path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    if tokenizer_config.get("chat_template") or default_chat_template(HuggingFaceTokenizer(folder)) != "llama3":
        return
    tokenizer_config["chat_template"] = CHAT_TEMPLATES["llama3"]
    _write_text(path, json.dumps(tokenizer_config, indent=2, ensure_ascii=False))


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
