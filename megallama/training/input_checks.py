"""Checks of a ``PretrainConfig`` against the filesystem, after the flags are validated and
before any work: the data files and tokenizer exist and the vocabulary fits, and ``--load`` and
``--save`` name what the run means them to (a mistyped ``--load`` fails here, not after the run has
started from scratch)."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional, Sequence

from megallama.config import LlamaConfig
from megallama.data.gpt_dataset import parse_data_path
from megallama.training.arguments_model import ConfigError, padded_vocab_size
from megallama.training.config import CheckpointArgs, PretrainConfig
from megallama.training.logger import WANDB_MISSING
from megallama.training.resumed_schedule import check_resumed_schedule


# What changes what a checkpoint's weights compute: loaded under other values of these, a run would fail
# deep inside loading or (rotary base, norm epsilon, rope scaling) train another model without a word.
WEIGHT_DEFINING_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
                          "ffn_hidden_size", "vocab_size", "norm_epsilon", "rope_theta", "rope_scaling",
                          "tie_word_embeddings")


def model_mismatch(stored: LlamaConfig, ours: LlamaConfig) -> Optional[str]:
    """``has FIELD STORED, the flags give OURS`` for the first weight-defining field that differs, else None."""
    for name in WEIGHT_DEFINING_FIELDS:
        theirs, mine = getattr(stored, name), getattr(ours, name)
        if theirs != mine:
            return f"has {name} {theirs}, the flags give {mine}"
    return None


def data_prefixes(data_path: Sequence[str]) -> list[str]:
    """The dataset prefixes of ``--data-path`` or ``--sft-data-path`` (``PREFIX`` or ``W1 PREFIX1 W2 PREFIX2 …``)."""
    try:
        return parse_data_path(data_path)[0]
    except ValueError as error:
        raise ConfigError(str(error)) from None


def sentencepiece_vocab_size(model_file: str) -> int:
    from megallama.tokenizer import SentencePieceTokenizer

    try:
        return SentencePieceTokenizer(model_file).vocab_size
    except (RuntimeError, OSError) as exc:  # sentencepiece's "could not parse ModelProto" (e.g. the .vocab file)
        raise ConfigError(f"tokenizer model {model_file} is not a SentencePiece model ({str(exc).strip()}) "
                          "(--tokenizer-model)") from None


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
                    hint = "; give the prefix, without .bin or .idx" if prefix.endswith((".bin", ".idx")) else ""
                    raise ConfigError(f"data file {prefix + ext} not found (from {flag} {prefix}){hint}")
    for prefix in data_prefixes(d.sft_data_path) if d.sft_data_path else []:
        from megallama.data.instructions import output_prefixes

        for path in (p + ext for p in output_prefixes(prefix) for ext in (".bin", ".idx")):
            if not os.path.isfile(path):
                raise ConfigError(f"instruction data file {path} not found (from --sft-data-path {prefix}; "
                                  "made by tools/preprocess_instructions.py)")
    if d.tokenizer_type in ("SentencePieceTokenizer", "HuggingFaceTokenizer"):
        if d.tokenizer_type == "SentencePieceTokenizer":
            if os.path.isdir(d.tokenizer_model):  # "not found" would send the user looking for a file that is there
                raise ConfigError(f"tokenizer model {d.tokenizer_model} is a folder: give a SentencePiece .model file, "
                                  "or --tokenizer-type HuggingFaceTokenizer for a folder holding tokenizer.json")
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
    for flag, path in (("--save", config.checkpoint.save), ("--tensorboard-dir", config.logging.tensorboard_dir),
                       ("--data-cache-path", d.data_cache_path), ("--wandb-save-dir", config.logging.wandb_save_dir)):
        if path:
            _check_output_folder(flag, path)
    check_checkpoint_folders(config)


def sft_truncation_notices(config: PretrainConfig) -> list[str]:
    """One line per ``--sft-data-path`` set that packing into ``--seq-length`` rows cuts examples of:
    training cuts them without a word. A damaged index is a ``ConfigError`` here, on every rank."""
    from megallama.data.sft_dataset import truncation_notice

    notices = []
    for prefix in data_prefixes(config.data.sft_data_path) if config.data.sft_data_path else []:
        try:
            notices.append(truncation_notice(prefix, config.training.seq_length))
        except (OSError, ValueError) as error:
            raise ConfigError(f"{error} (from --sft-data-path {prefix})") from None
    return [n for n in notices if n]


def _same_folder(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def check_checkpoint_folders(config: PretrainConfig) -> None:
    """A ``--load`` naming no checkpoint is a mistyped path unless it is the ``--save`` folder
    (resume-or-start) or ``--allow-no-checkpoint`` says so (and never with
    ``--exit-on-missing-checkpoint``); a run starting below the iteration ``--save`` already holds
    would rewind that folder's tracker, unless ``--rewind-save``; the checkpoint resumed must fit the
    run (``_check_resumed``)."""
    from megallama.checkpoint.storage import CheckpointError, read_tracker

    ck = config.checkpoint
    try:
        saved = read_tracker(ck.save) if ck.save else None
        if ck.finetune:  # --load is the weights to start from; the run resumes only from --save
            if saved is None:  # then it starts from --load: a typo there must not wait for the model
                _check_finetune_load(ck)
            else:  # a relaunch continues this run's schedule: another --train-iters must not reshape it
                _check_resumed(ck.save, saved, config, "--save")
            return
        loaded = read_tracker(ck.load) if ck.load else None
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    if ck.load and loaded is None and (ck.exit_on_missing_checkpoint
                                       or not (_same_folder(ck.load, ck.save) or ck.allow_no_checkpoint)):
        what = "does not exist" if not os.path.exists(ck.load) else "holds no checkpoint (no latest_checkpointed_iteration.txt)"
        if ck.exit_on_missing_checkpoint:
            raise ConfigError(f"--load {ck.load} {what}, and --exit-on-missing-checkpoint stops the run instead of "
                              "training from scratch")
        raise ConfigError(f"--load {ck.load} {what}; to train from scratch drop --load, give --load the --save "
                          "folder, or add --allow-no-checkpoint")
    start = (ck.ckpt_step if ck.ckpt_step is not None else loaded) if ck.load else None
    if start is not None:
        _require_saved(ck.load, start, f"--ckpt-step {start}" if ck.ckpt_step is not None else f"--load {ck.load}")
        _check_resumed(ck.load, start, config)
    start = 0 if start is None else start
    if saved is not None and start < saved and not ck.rewind_save:
        raise ConfigError(f"--save {ck.save} already holds iteration {saved} and this run starts at iteration "
                          f"{start}: its saves would move that tracker back and replace later checkpoints; "
                          "give another --save, or --rewind-save to do it on purpose")


def _require_saved(root: str, iteration: int, flag: str) -> None:
    """A --ckpt-step never saved (or a tracker whose folder was deleted) fails here, not after the
    data and the model are built."""
    from megallama.checkpoint.storage import checkpoint_dir, no_such_iteration

    if not os.path.isdir(checkpoint_dir(root, iteration)):
        raise ConfigError(f"{flag}: {no_such_iteration(root, iteration)}")


def _check_finetune_load(ck: CheckpointArgs) -> None:
    """``--finetune --load`` (and its ``--ckpt-step``) name something to read."""
    if not os.path.exists(ck.load):
        raise ConfigError(f"--finetune --load {ck.load} does not exist (a megallama checkpoint folder, or an HF "
                          "or Meta LLaMA folder)")
    if ck.ckpt_step is not None:
        _require_saved(ck.load, ck.ckpt_step, f"--ckpt-step {ck.ckpt_step}")


def _check_resumed(root: str, iteration: int, config: PretrainConfig, flag: str = "--load") -> None:
    """From the checkpoint's stored run config: it was trained as the model the flags describe, it
    holds the optimizer state the run will load, and its lr schedule is the flags' (or the flags say
    which one wins, ``resumed_schedule``). With ``--use-checkpoint-opt_param-scheduler`` this sets
    ``config``'s schedule to the checkpoint's. ``flag`` names the folder resumed (``--save`` for a
    relaunched ``--finetune``)."""
    from megallama.checkpoint.storage import CheckpointError, checkpoint_dir, read_metadata

    try:
        stored = read_metadata(checkpoint_dir(root, iteration))["common"]["config"]
        model = LlamaConfig.from_run_config(stored)
    except (CheckpointError, KeyError, TypeError, ValueError):
        return  # a damaged index is the loader's to report, with the checkpoint to fall back to
    where = f"{flag} {root} (iteration {iteration})"
    problem = model_mismatch(model, config.model)
    if problem:
        raise ConfigError(f"{where} {problem}: resume with the flags it was trained with")
    # As Megatron: resuming a checkpoint saved without optimizer state must say it starts AdamW afresh.
    if (stored.get("checkpoint") or {}).get("no_save_optim") and not config.checkpoint.no_load_optim:
        raise ConfigError(f"{where} was saved without optimizer state (--no-save-optim): resume it with "
                          "--no-load-optim (fresh AdamW moments)")
    check_resumed_schedule(stored, config, where)


def _check_output_folder(flag: str, path: str) -> None:
    """``path`` can become a folder this process writes to; else a traceback during set-up or, for
    ``--save``, at the first save, after the iterations before it were trained (and are lost)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {existing} is not writable")
