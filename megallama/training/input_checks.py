"""Checks of a ``PretrainConfig`` against the filesystem, after the flags are validated and
before any work: the data files and tokenizer exist and the vocabulary fits, and ``--load`` and
``--save`` name what the run means them to (a mistyped ``--load`` fails here, not after the run has
started from scratch)."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Sequence

from megallama.data.gpt_dataset import parse_data_path
from megallama.training.arguments_model import ConfigError, padded_vocab_size
from megallama.training.config import CheckpointArgs, PretrainConfig
from megallama.training.logger import WANDB_MISSING


def data_prefixes(data_path: Sequence[str]) -> list[str]:
    """The dataset prefixes of ``--data-path`` or ``--sft-data-path`` (``PREFIX`` or ``W1 PREFIX1 W2 PREFIX2 …``)."""
    try:
        return parse_data_path(data_path)[0]
    except ValueError as error:
        raise ConfigError(str(error)) from None


def sentencepiece_vocab_size(model_file: str) -> int:
    from megallama.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(model_file).vocab_size


def huggingface_vocab_size(folder: str) -> int:
    from megallama.tokenizer import HuggingFaceTokenizer

    try:
        return HuggingFaceTokenizer(folder).vocab_size
    except ValueError as exc:  # the folder names no usable eos_token
        raise ConfigError(f"{exc} (--tokenizer-model)") from None


def check_inputs(config: PretrainConfig, vocab_size_given: bool = True) -> None:
    """Checks against the filesystem: data files and tokenizer exist, the vocabulary fits.

    Sets ``model.vocab_size`` to the tokenizer's unless ``--vocab-size`` was given (``vocab_size_given``).
    """
    d = config.data
    for flag, paths in (("--data-path", d.data_path), ("--train-data-path", d.train_data_path),
                        ("--valid-data-path", d.valid_data_path), ("--test-data-path", d.test_data_path)):
        for prefix in data_prefixes(paths) if paths else []:
            for ext in (".bin", ".idx"):
                if not os.path.isfile(prefix + ext):
                    raise ConfigError(f"data file {prefix + ext} not found (from {flag} {prefix})")
    for prefix in data_prefixes(d.sft_data_path) if d.sft_data_path else []:
        from megallama.data.instructions import output_prefixes

        for path in (p + ext for p in output_prefixes(prefix) for ext in (".bin", ".idx")):
            if not os.path.isfile(path):
                raise ConfigError(f"instruction data file {path} not found (from --sft-data-path {prefix}; "
                                  "made by tools/preprocess_instructions.py)")
    if d.tokenizer_type in ("SentencePieceTokenizer", "HuggingFaceTokenizer"):
        if d.tokenizer_type == "SentencePieceTokenizer":
            if not os.path.isfile(d.tokenizer_model):
                raise ConfigError(f"tokenizer model {d.tokenizer_model} not found (--tokenizer-model)")
            vocab = sentencepiece_vocab_size(d.tokenizer_model)
        else:
            if not os.path.isfile(os.path.join(d.tokenizer_model, "tokenizer.json")):
                raise ConfigError(f"tokenizer folder {d.tokenizer_model} has no tokenizer.json (--tokenizer-model)")
            vocab = huggingface_vocab_size(d.tokenizer_model)
        if not vocab_size_given:
            config.model.vocab_size = padded_vocab_size(vocab, d.make_vocab_size_divisible_by,
                                                        config.parallel.tensor_model_parallel_size)
        elif vocab > config.model.vocab_size:
            raise ConfigError(f"tokenizer {d.tokenizer_model} has {vocab} tokens, more than --vocab-size "
                              f"{config.model.vocab_size}")
    if config.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(WANDB_MISSING)
    check_checkpoint_folders(config.checkpoint)


def _same_folder(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def check_checkpoint_folders(ck: CheckpointArgs) -> None:
    """A ``--load`` naming no checkpoint is a mistyped path unless it is the ``--save`` folder
    (resume-or-start) or ``--allow-no-checkpoint`` says so; a run starting below the iteration
    ``--save`` already holds would rewind that folder's tracker, unless ``--rewind-save``."""
    from megallama.checkpoint.storage import CheckpointError, read_tracker

    if ck.finetune:  # --load is the weights to start from; the run resumes only from --save
        return
    try:
        loaded = read_tracker(ck.load) if ck.load else None
        saved = read_tracker(ck.save) if ck.save else None
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    if ck.load and loaded is None and not (_same_folder(ck.load, ck.save) or ck.allow_no_checkpoint):
        what = "does not exist" if not os.path.exists(ck.load) else "holds no checkpoint (no latest_checkpointed_iteration.txt)"
        raise ConfigError(f"--load {ck.load} {what}; to train from scratch drop --load, give --load the --save "
                          "folder, or add --allow-no-checkpoint")
    start = (ck.ckpt_step if ck.ckpt_step is not None else loaded) if ck.load else None
    start = 0 if start is None else start
    if saved is not None and start < saved and not ck.rewind_save:
        raise ConfigError(f"--save {ck.save} already holds iteration {saved} and this run starts at iteration "
                          f"{start}: its saves would move that tracker back and replace later checkpoints; "
                          "give another --save, or --rewind-save to do it on purpose")
