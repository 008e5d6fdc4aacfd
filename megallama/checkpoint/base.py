"""What every checkpoint format shares: the reader interface, the registry entry a format fills in,
the tokenizer that goes with a checkpoint, and small writing helpers. What the parameters are
(names, shapes, splits, HF and Meta names) is the model's ``megallama.parameter_table``."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable

import torch

from megallama.config import LlamaConfig
from megallama.fileio import atomic_path
from megallama.parameter_table import ParameterSpec, parameter_table
from megallama.tokenizer import load_tokenizer


class CheckpointReader:
    """Full tensors of one checkpoint under megallama's parameter names (subclasses say how)."""

    config: LlamaConfig
    source: str
    format: str

    def load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in."""
        raise NotImplementedError

    @functools.cached_property
    def table(self) -> dict[str, ParameterSpec]:
        """The model's parameter table for this checkpoint's configuration."""
        return parameter_table(self.config)

    def names(self) -> list[str]:
        return list(self.table)

    def tokenizer_model(self) -> str | None:
        """The tokenizer stored with the checkpoint, if any: a SentencePiece model file or a Hugging
        Face tokenizer folder (see ``stored_tokenizer``)."""
        return None


@dataclass(frozen=True)
class CheckpointFormat:
    """One on-disk format in the registry: its name, how to recognise its folder from the names of
    the files in it (``looks_for`` says what that is, for error messages), its reader and writer.

    ``writer(reader, folder, tensor_parallel_size, pipeline_parallel_size, tokenizer_model,
    progress)``: the sizes are None when not asked for; a format that cannot be split that way
    raises ValueError before it writes anything."""

    name: str
    detect: Callable[[set], bool]
    looks_for: str
    reader: Callable[[str], CheckpointReader]
    writer: Callable[..., None]


def progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it to ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)


# chat_template.jinja: where recent transformers save a tokenizer's chat template
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def is_hf_tokenizer(tokenizer: str) -> bool:
    """Whether a tokenizer path is a Hugging Face tokenizer folder (``tokenizer.json``, e.g.
    LLaMA-3's) rather than a SentencePiece model file."""
    return os.path.isfile(os.path.join(tokenizer, "tokenizer.json"))


def stored_tokenizer(folder: str) -> str | None:
    """The tokenizer a checkpoint folder holds: its SentencePiece ``tokenizer.model`` (LLaMA-1/2;
    preferred, as HF exports of those hold both), else the folder itself when it holds a
    ``tokenizer.json``."""
    path = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(path):
        return path
    return folder if is_hf_tokenizer(folder) else None


def load_matching_tokenizer(config: LlamaConfig, path: str, tokenizer_type: str | None = None):
    """The tokenizer at ``path`` (as ``megallama.tokenizer.load_tokenizer``), refused with a
    ValueError when it cannot be read or has more tokens than the model of ``config`` embeds: its
    ids would index past the embedding (an IndexError deep in the forward)."""
    try:
        tokenizer = load_tokenizer(path, tokenizer_type)
    except (OSError, ValueError):  # megallama.tokenizer's own messages: a missing file, a missing token
        raise
    except Exception as error:  # sentencepiece's RuntimeError, the tokenizers library's bare Exception
        raise ValueError(f"cannot read tokenizer model {path}: {error}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer {path} has {tokenizer.vocab_size} tokens but the model's vocabulary holds "
                         f"{config.vocab_size}: it is not the tokenizer this checkpoint was trained with")
    return tokenizer


def copy_tokenizer(tokenizer_model: str | None, folder: str) -> None:
    """Store the tokenizer in ``folder``: a SentencePiece model as ``tokenizer.model`` (Meta's and
    HF's name), a Hugging Face tokenizer folder's files under their own names."""
    if tokenizer_model is None:
        return
    if is_hf_tokenizer(tokenizer_model):
        for name in HF_TOKENIZER_FILES:
            if os.path.isfile(os.path.join(tokenizer_model, name)):
                _copy_file(os.path.join(tokenizer_model, name), os.path.join(folder, name))
    else:
        _copy_file(tokenizer_model, os.path.join(folder, "tokenizer.model"))


def _copy_file(source: str, target: str) -> None:
    if os.path.abspath(source) == os.path.abspath(target):
        return
    with open(source, "rb") as f:
        data = f.read()

    def write(tmp):
        with open(tmp, "wb") as out:
            out.write(data)
    atomic_write(target, write)
