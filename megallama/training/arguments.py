"""Command-line flags of ``megallama.pretrain`` → a validated ``PretrainConfig``.

Flags keep Megatron-LM's names so launch scripts carry over. Defaults are the LLaMA paper's
(AdamW β = (0.9, 0.95), weight decay 0.1, clipping 1.0, 2000 warmup iterations, cosine decay to 10%
of the peak lr). Every check that can fail is done here, before any process group or tensor exists,
and by every rank alike: a bad configuration stops all ranks with the same one-line message instead
of hanging some of them in a collective.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megallama.config import LlamaConfig
from megallama.data.gpt_dataset import parse_split
from megallama.distributed.optimizer import OptimizerConfig
from megallama.training.arguments_model import (
    ConfigError,
    HelpFormatter,
    add_model_arguments,
    ignored_model_flags,
    in_flag_words,
    model_from_namespace,
)
from megallama.training.batch_schedule import GlobalBatchSchedule
from megallama.training.config import (
    PAPER_PEAK_LR,
    CheckpointArgs,
    DataArgs,
    LoggingArgs,
    LRScheduleArgs,
    ParallelArgs,
    PretrainConfig,
    TrainingArgs,
)
from megallama.training.input_checks import check_inputs, data_prefixes, sft_truncation_notices
from megallama.training.megatron_flags import (
    add_megatron_compatibility_flags,
    check_megatron_compatibility_flags,
    ignored_megatron_flags,
)

__all__ = ["ConfigError", "in_flag_words", "build_parser", "parse_args"]

DECAY_STYLES = ("cosine", "linear", "constant")
TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")
# Megatron's other names for a SentencePiece model, accepted so launch scripts carry over.
SENTENCEPIECE_ALIASES = ("GPTSentencePieceTokenizer", "Llama2Tokenizer")
LLAMA_WARMUP_ITERS = 2000


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, reported as every other bad flag is (a ``ConfigError``: exit status 2,
    naming the rank), not argparse's ~100-line usage block on every rank; a mistyped flag names the
    closest real one (abbreviations are off, so ``--train-iter`` is not read as ``--train-iters``)."""

    def error(self, message: str):
        unknown = re.findall(r"(?<!\S)--[\w-]+", message) if message.startswith("unrecognized arguments") else []
        flags = [option for action in self._actions for option in action.option_strings]
        close = [match for word in unknown for match in difflib.get_close_matches(word, flags, n=1)]
        raise ConfigError(message + (f" (did you mean {', '.join(close)}?)" if close else "")
                          + "; --help lists the flags")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="megallama.pretrain",
        description="Pretrain a LLaMA model. Launch with `torchrun [torchrun flags] -m megallama.pretrain "
        "[flags]`; a plain `python -m megallama.pretrain` runs a single process.",
        formatter_class=HelpFormatter,
        allow_abbrev=False,  # as Megatron: a Megatron flag must never be read as an abbreviation of ours
    )
    add_model_arguments(p)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="Ranks each layer's matmuls are split over (heads and FFN columns).")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="Pipeline stages the layer stack is split into.")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="Layers per model chunk for the interleaved 1F1B schedule; unset = plain 1F1B.")
    g.add_argument("--overlap-p2p-communication", dest="overlap_p2p_comm",
                   action=argparse.BooleanOptionalAction, default=True,
                   help="Interleaved schedule only: post each exchange between pipeline stages right after the "
                   "compute that produces it and wait for it only before the compute that needs it, so "
                   "transfers overlap compute (Megatron's default); bit-identical results either way.")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Shard norm regions' activations along the sequence over the tensor-parallel ranks.")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Shard fp32 main weights and AdamW state over data-parallel ranks (ZeRO-1).")
    g.add_argument("--overlap-grad-reduce", action=argparse.BooleanOptionalAction, default=True,
                   help="Start each gradient bucket's data-parallel reduction during backward, as soon as its "
                   "gradients are ready. Megatron's default is off; megallama keeps it on because the result is "
                   "bit-identical either way (only the speed differs); --no-overlap-grad-reduce waits for the "
                   "whole backward, as Megatron without the flag.")
    g.add_argument("--gradient-accumulation-fusion", action=argparse.BooleanOptionalAction, default=True,
                   help="Weight-gradient GEMMs add into the fp32 main gradients themselves (Megatron's default); "
                   "--no-gradient-accumulation-fusion makes a gradient in the weights' dtype, then adds it.")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="Leave the distributed optimizer's parameter all-gathers in flight until the next forward "
                   "needs each bucket (needs --use-distributed-optimizer and the gradient overlap).")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="torch.distributed backend; default nccl with CUDA, else gloo.")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="Collective timeout, so a failed rank stops the others instead of hanging them.")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1, help="Sequences per forward pass on one rank.")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Sequences per optimizer step over all ranks (the paper: 4M tokens = 2048 × 2048); "
                   "default micro-batch × data-parallel size.")
    g.add_argument("--train-iters", type=int, default=None,
                   help="Optimizer steps to train for (give this or --train-samples).")
    g.add_argument("--train-samples", type=int, default=None,
                   help="Sequences to train on, instead of --train-iters: --train-samples // --global-batch-size "
                   "iterations, with the lr schedule in samples (--lr-decay-samples, --lr-warmup-samples), "
                   "as Megatron.")
    g.add_argument("--rampup-batch-size", type=int, nargs=3, default=None, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="Grow the global batch from START sequences by INCREMENT over SAMPLES consumed samples "
                   "to --global-batch-size, as Megatron (GPT-3's ramp; needs --train-samples). Each size must "
                   "be a multiple of --micro-batch-size × data-parallel size.")
    g.add_argument("--seed", type=int, default=1234, help="Seed of initialisation and data order.")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 parameters and activations with fp32 main weights and fp32 gradient accumulation.")
    g.add_argument("--eval-interval", type=int, default=1000, help="Iterations between validation runs.")
    g.add_argument("--eval-iters", type=int, default=100, help="Batches per validation run (0 = no validation).")
    g.add_argument("--exit-signal-handler", action=argparse.BooleanOptionalAction, default=None,
                   help="On SIGTERM, SIGINT or SIGUSR1 (a preemption, a time limit), finish the current "
                   "iteration, save (with --save) and exit 0 on every rank. Default: on when --save is given.")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="Stop (saving with --save) after the first iteration that ends this many minutes "
                   "after the run started (set-up and checkpoint loading count).")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="Stop (saving with --save) after the first iteration divisible by this.")
    g.add_argument("--manual-gc", action="store_true",
                   help="Turn Python's automatic garbage collection off and collect at fixed points instead "
                   "(around each validation, every --manual-gc-interval iterations), so no rank stalls the others "
                   "at a random step.")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="With --manual-gc: collect every this many iterations (0: only around validation).")
    g.add_argument("--num-workers", type=int, default=0,
                   help="Background threads that read and collate the next global batch while the current "
                   "iteration runs (Megatron's DataLoader workers); the samples and their order are the same "
                   "with any number. 0: read in the training thread.")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true",
                   help="Accepted; always so here: the vocab-parallel cross entropy is one fused function that "
                   "never gathers the full logits.")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="Accepted; always so here: the loss is the sum over the global batch's loss-counted "
                   "tokens divided by their number (not a mean of per-micro-batch means).")
    g.add_argument("--profile", action="store_true",
                   help="Profile iterations [--profile-step-start, --profile-step-end) on --profile-ranks: mark them "
                   "for `nsys profile --capture-range=cudaProfilerApi` (CUDA), or --use-pytorch-profiler.")
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="With --profile: record with torch.profiler into --tensorboard-dir a trace "
                   "(rank{r}.iter{a}-{b}.pt.trace.json) and a table of the operators by own time (.txt).")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0], help="Global ranks that profile.")
    g.add_argument("--profile-step-start", type=int, default=10, help="First profiled iteration (with --profile).")
    g.add_argument("--profile-step-end", type=int, default=12,
                   help="Iteration at which profiling stops (with --profile).")

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--lr", type=float, default=None,
                   help="Peak learning rate; default the paper's for --model-size (3e-4 at 7B/13B, 1.5e-4 at "
                   "33B/65B), else 3e-4.")
    g.add_argument("--min-lr", type=float, default=None, help="Floor of the decay; default 10%% of --lr.")
    g.add_argument("--decoupled-lr", type=float, default=None,
                   help="Peak lr of the input embedding and the output layer (their own param group, same warmup "
                   "and decay shape), as Megatron; unset: --lr.")
    g.add_argument("--decoupled-min-lr", type=float, default=None,
                   help="Floor of --decoupled-lr's decay; unset: --min-lr. Without --decoupled-lr it does nothing "
                   "(as Megatron).")
    g.add_argument("--lr-decay-style", choices=DECAY_STYLES, default="cosine", help="Shape of the decay.")
    g.add_argument("--lr-warmup-iters", type=int, default=None,
                   help=f"Iterations of linear warmup from 0; default {LLAMA_WARMUP_ITERS} (LLaMA's) unless "
                   "--lr-warmup-fraction, --lr-warmup-samples or --train-samples is given (then Megatron's 0).")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="Iteration at which the lr reaches --min-lr; default --train-iters.")
    g.add_argument("--lr-warmup-samples", type=int, default=None,
                   help="Samples of linear warmup, with --train-samples; default 0.")
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="Samples after which the lr is --min-lr, with --train-samples; default --train-samples.")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="Warmup length as this fraction of the decay length (--lr-decay-iters or "
                   "--lr-decay-samples), counted in samples as Megatron; instead of --lr-warmup-iters/-samples.")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay.")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW β1 (first-moment decay).")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW β2 (second-moment decay).")
    g.add_argument("--adam-eps", type=float, default=1e-8,
                   help="AdamW epsilon (the paper gives none; Megatron's default).")
    g.add_argument("--clip-grad", type=float, default=1.0, help="Clip the global gradient norm to this (0 = off).")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=[],
                   help="Megatron indexed datasets: PREFIX, or W1 PREFIX1 W2 PREFIX2 … for a weighted blend "
                   "(PREFIX.bin and PREFIX.idx must exist).")
    g.add_argument("--split", default="969,30,1", help="Train,valid,test proportions of each dataset.")
    for split in ("train", "valid", "test"):
        g.add_argument(f"--{split}-data-path", nargs="*", default=[],
                       help=f"Whole datasets for {split} alone (PREFIX or W1 PREFIX1 …), instead of --data-path "
                       "and --split" + (" (accepted; megallama runs no test pass)" if split == "test" else "") + ".")
    g.add_argument("--mock-data", action="store_true",
                   help="Deterministic synthetic tokens indexed by global sample number (tests, benchmarks).")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES + SENTENCEPIECE_ALIASES, default=None,
                   help="Default SentencePieceTokenizer when --tokenizer-model is given, else NullTokenizer "
                   "(Megatron's GPTSentencePieceTokenizer and Llama2Tokenizer mean SentencePieceTokenizer).")
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model file; for HuggingFaceTokenizer the folder holding tokenizer.json.")
    g.add_argument("--data-cache-path", default=None,
                   help="Folder for the sample-index cache; default beside the data.")
    g.add_argument("--sft-data-path", nargs="*", default=[],
                   help="Instruction data for finetuning: PREFIX or W1 PREFIX1 W2 PREFIX2 …, each the "
                   "--output-prefix of tools/preprocess_instructions.py; examples are packed into "
                   "--seq-length rows, isolated from each other, loss on answer tokens only.")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="Restart positions after each EOD token (needs --reset-attention-mask: both go together).")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="Tokens attend only within their own document (EOD-delimited); with --reset-position-ids.")
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="No loss on positions whose input token is EOD (predicting across documents).")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None, help="Folder to write checkpoints to (SAVE/iter_NNNNNNN/).")
    g.add_argument("--load", default=None,
                   help="Folder to resume from (its latest_checkpointed_iteration.txt); any parallel layout.")
    g.add_argument("--save-interval", type=int, default=None,
                   help="Iterations between checkpoints; the last iteration is always saved when --save is set.")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="Load this iteration's checkpoint from --load instead of the latest one.")
    g.add_argument("--no-load-optim", action="store_true", help="Load weights only; fresh optimizer state.")
    g.add_argument("--no-load-rng", action="store_true", help="Do not restore the saved RNG states.")
    g.add_argument("--no-save-optim", action="store_true",
                   help="Save weights without the optimizer state (a resume from them needs --no-load-optim).")
    g.add_argument("--no-save-rng", action="store_true",
                   help="Save without the RNG states (a resume then keeps its own; LLaMA draws no random numbers "
                   "while training).")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="Stop when --load holds no checkpoint, also where the run would otherwise train from scratch "
                   "(--load is the --save folder, or --allow-no-checkpoint).")
    schedule = g.add_mutually_exclusive_group()
    schedule.add_argument("--override-opt_param-scheduler", action="store_true",
                          help="On resuming, use the flags' lr schedule (--lr, --min-lr, warmup, decay length and "
                          "style, --decoupled-lr/--decoupled-min-lr, --weight-decay) where the checkpoint's differs. "
                          "Without this or --use-checkpoint-opt_param-scheduler a difference is an error, as Megatron.")
    schedule.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                          help="On resuming, use the checkpoint's lr schedule where the flags' differs.")
    g.add_argument("--allow-no-checkpoint", action="store_true",
                   help="Train from scratch when --load holds no checkpoint. Without it that is an error (a "
                   "mistyped path), unless --load is the --save folder (resume-or-start).")
    g.add_argument("--rewind-save", action="store_true",
                   help="Allow a run starting below the iteration --save's tracker names (e.g. restarting "
                   "from an earlier --ckpt-step into the same folder): its saves move the tracker back and "
                   "replace the later iter_* folders. Without it that is an error.")
    g.add_argument("--finetune", action="store_true",
                   help="Start from the weights in --load (a megallama checkpoint of any layout, or an HF "
                   "LLaMA folder) with iteration, optimizer and lr schedule reset. If --save already holds "
                   "a checkpoint of this run, resume that instead (a relaunch continues, not restarts).")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100, help="Iterations between console/TensorBoard logs.")
    g.add_argument("--tensorboard-dir", default=None, help="Write TensorBoard scalars here.")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="Peak TFLOP/s of one device for MFU; default detected for known GPUs (none on CPU).")
    g.add_argument("--log-throughput", action="store_true",
                   help="Also write Megatron's `throughput` scalar (TFLOP/s per device); the console line always "
                   "shows tokens/s, TFLOP/s and MFU.")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="Also write per-phase times: forward-backward-time, optimizer-time, batch-generator-time "
                   "(iteration-time is always written).")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="Also write mem-allocated-bytes and mem-reserved-bytes (CUDA; on CPU the current resident "
                   "set size as mem-allocated-bytes); mem-max-allocated-bytes is always written.")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="Also write `lm loss validation ppl` = exp(min(20, validation loss)), as Megatron.")
    g.add_argument("--log-params-norm", action="store_true",
                   help="Also log the L2 norm of all parameters (console `params norm`, TensorBoard `params-norm`), "
                   "computed at each --log-interval report.")
    g.add_argument("--wandb-project", default=None,
                   help="Also log the scalars to this Weights & Biases project (needs `pip install -e .[wandb]`); "
                   "empty or absent: off.")
    g.add_argument("--wandb-exp-name", default=None, help="Weights & Biases run name (with --wandb-project).")
    g.add_argument("--wandb-save-dir", default=None,
                   help="Local Weights & Biases folder (with --wandb-project); default SAVE/wandb with --save, "
                   "else wandb/ under the current folder.")
    return add_megatron_compatibility_flags(p)


def _world_size(env) -> int:
    return int(env.get("WORLD_SIZE", "1"))


def _training_length(ns: argparse.Namespace, global_batch: int) -> tuple[int, dict]:
    """(train iterations, the lr schedule's length fields) from iteration or sample flags, with
    Megatron's rules for which go together."""
    if (ns.train_iters is None) == (ns.train_samples is None):
        raise ConfigError("give exactly one of --train-iters and --train-samples")
    if ns.lr_warmup_fraction is not None and (ns.lr_warmup_iters is not None or ns.lr_warmup_samples is not None):
        raise ConfigError("--lr-warmup-fraction replaces --lr-warmup-iters and --lr-warmup-samples: give only one")
    if ns.train_samples is not None:
        if ns.lr_decay_iters is not None or ns.lr_warmup_iters is not None:
            raise ConfigError("--train-samples counts the lr schedule in samples: give --lr-decay-samples and "
                              "--lr-warmup-samples instead of --lr-decay-iters and --lr-warmup-iters")
        try:
            train_iters = GlobalBatchSchedule.of(global_batch, ns.rampup_batch_size).iterations_for(ns.train_samples)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if train_iters < 1:
            first = f"--rampup-batch-size start {ns.rampup_batch_size[0]}" if ns.rampup_batch_size \
                else f"--global-batch-size {global_batch}"
            raise ConfigError(f"--train-samples {ns.train_samples} is less than one {first}")
        return train_iters, dict(
            lr_warmup_iters=0, lr_decay_iters=train_iters,
            lr_warmup_samples=ns.lr_warmup_samples if ns.lr_warmup_samples is not None else 0,
            lr_decay_samples=ns.lr_decay_samples if ns.lr_decay_samples is not None else ns.train_samples,
            lr_warmup_fraction=ns.lr_warmup_fraction)
    if ns.rampup_batch_size is not None:
        raise ConfigError("--rampup-batch-size needs --train-samples instead of --train-iters (as Megatron: the "
                          "ramp and the run are counted in samples)")
    if ns.lr_decay_samples is not None or ns.lr_warmup_samples is not None:
        raise ConfigError("--lr-decay-samples and --lr-warmup-samples go with --train-samples; with --train-iters "
                          "give --lr-decay-iters and --lr-warmup-iters")
    # LLaMA's 2000-iteration warmup is megallama's default only where no Megatron warmup flag says otherwise.
    warmup = ns.lr_warmup_iters if ns.lr_warmup_iters is not None else \
        (0 if ns.lr_warmup_fraction is not None else LLAMA_WARMUP_ITERS)
    return ns.train_iters, dict(
        lr_warmup_iters=warmup, lr_decay_iters=ns.lr_decay_iters if ns.lr_decay_iters is not None else ns.train_iters,
        lr_warmup_fraction=ns.lr_warmup_fraction)


def _attention_backend(ns: argparse.Namespace) -> str:
    if ns.use_flash_attn and ns.attention_backend not in ("auto", "flash"):
        raise ConfigError(f"--use-flash-attn asks for --attention-backend flash, not {ns.attention_backend}")
    return "flash" if ns.use_flash_attn else ns.attention_backend


def config_from_namespace(ns: argparse.Namespace, world_size: int) -> PretrainConfig:
    """Fill the defaults that depend on other flags and group the flags into a ``PretrainConfig``.

    Without ``--vocab-size`` the vocabulary is LLaMA's 32000 until ``check_inputs`` reads the tokenizer's.
    """
    model = model_from_namespace(ns)
    tokenizer_type = ns.tokenizer_type or ("SentencePieceTokenizer" if ns.tokenizer_model else "NullTokenizer")
    if tokenizer_type in SENTENCEPIECE_ALIASES:
        tokenizer_type = "SentencePieceTokenizer"
    lr = ns.lr if ns.lr is not None else PAPER_PEAK_LR.get(ns.model_size, 3.0e-4)
    parallel = ParallelArgs(
        tensor_model_parallel_size=ns.tensor_model_parallel_size,
        pipeline_model_parallel_size=ns.pipeline_model_parallel_size,
        num_layers_per_virtual_pipeline_stage=ns.num_layers_per_virtual_pipeline_stage,
        overlap_p2p_comm=ns.overlap_p2p_comm,
        world_size=world_size,
        distributed_backend=ns.distributed_backend,
        distributed_timeout_minutes=ns.distributed_timeout_minutes,
    )
    _check_parallel_layout(model, parallel)
    # Before anything divides by them (--train-samples does); 0 must not read as "not given".
    for flag, value in (("--micro-batch-size", ns.micro_batch_size), ("--global-batch-size", ns.global_batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    global_batch = ns.global_batch_size if ns.global_batch_size is not None else \
        ns.micro_batch_size * parallel.data_parallel_size
    train_iters, lr_lengths = _training_length(ns, global_batch)
    if ns.overlap_param_gather and not ns.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer (only it all-gathers "
                          "parameters after the step)")
    if ns.overlap_param_gather and not ns.overlap_grad_reduce:
        raise ConfigError("--overlap-param-gather needs the gradient overlap: drop --no-overlap-grad-reduce")
    return PretrainConfig(
        model=model,
        parallel=parallel,
        optimizer=OptimizerConfig(
            lr=lr, weight_decay=ns.weight_decay, adam_beta1=ns.adam_beta1, adam_beta2=ns.adam_beta2,
            adam_eps=ns.adam_eps, clip_grad=ns.clip_grad, use_distributed_optimizer=ns.use_distributed_optimizer,
            overlap_grad_reduce=ns.overlap_grad_reduce, overlap_param_gather=ns.overlap_param_gather,
            gradient_accumulation_fusion=ns.gradient_accumulation_fusion, decoupled_lr=ns.decoupled_lr, decoupled_min_lr=ns.decoupled_min_lr,
        ),
        lr_schedule=LRScheduleArgs(
            min_lr=ns.min_lr if ns.min_lr is not None else 0.1 * lr, lr_decay_style=ns.lr_decay_style, **lr_lengths,
        ),
        training=TrainingArgs(
            micro_batch_size=ns.micro_batch_size, global_batch_size=global_batch, seq_length=ns.seq_length,
            train_iters=train_iters, rampup_batch_size=ns.rampup_batch_size, seed=ns.seed, eval_interval=ns.eval_interval, eval_iters=ns.eval_iters,
            exit_signal_handler=ns.exit_signal_handler if ns.exit_signal_handler is not None else ns.save is not None,
            exit_duration_in_mins=ns.exit_duration_in_mins, exit_interval=ns.exit_interval,
            manual_gc=ns.manual_gc, manual_gc_interval=ns.manual_gc_interval, num_workers=ns.num_workers,
            attention_backend=_attention_backend(ns), profile=ns.profile,
            profile_step_start=ns.profile_step_start, profile_step_end=ns.profile_step_end,
            profile_ranks=list(ns.profile_ranks), use_pytorch_profiler=ns.use_pytorch_profiler,
        ),
        data=DataArgs(
            data_path=list(ns.data_path), split=ns.split, mock_data=ns.mock_data,
            train_data_path=list(ns.train_data_path), valid_data_path=list(ns.valid_data_path),
            test_data_path=list(ns.test_data_path),
            tokenizer_type=tokenizer_type, tokenizer_model=ns.tokenizer_model,
            data_cache_path=ns.data_cache_path, sft_data_path=list(ns.sft_data_path),
            reset_position_ids=ns.reset_position_ids, reset_attention_mask=ns.reset_attention_mask,
            eod_mask_loss=ns.eod_mask_loss, make_vocab_size_divisible_by=ns.make_vocab_size_divisible_by,
        ),
        checkpoint=CheckpointArgs(
            save=ns.save, load=ns.load, save_interval=ns.save_interval, ckpt_step=ns.ckpt_step,
            no_load_optim=ns.no_load_optim, no_load_rng=ns.no_load_rng, finetune=ns.finetune,
            allow_no_checkpoint=ns.allow_no_checkpoint, rewind_save=ns.rewind_save,
            no_save_optim=ns.no_save_optim, no_save_rng=ns.no_save_rng,
            exit_on_missing_checkpoint=ns.exit_on_missing_checkpoint,
            override_opt_param_scheduler=ns.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=ns.use_checkpoint_opt_param_scheduler,
        ),
        logging=LoggingArgs(
            log_interval=ns.log_interval, tensorboard_dir=ns.tensorboard_dir, peak_tflops=ns.peak_tflops,
            log_throughput=ns.log_throughput, log_timers_to_tensorboard=ns.log_timers_to_tensorboard,
            log_memory_to_tensorboard=ns.log_memory_to_tensorboard,
            log_validation_ppl_to_tensorboard=ns.log_validation_ppl_to_tensorboard,
            log_params_norm=ns.log_params_norm,
            wandb_project=ns.wandb_project or None, wandb_exp_name=ns.wandb_exp_name,
            wandb_save_dir=ns.wandb_save_dir,
        ),
    )


def _check_parallel_layout(model: LlamaConfig, par: ParallelArgs) -> None:
    """The model splits over the layout and the layout over the world size."""
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    try:
        model.check_parallel_layout(tp, pp, par.virtual_pipeline_model_parallel_size(model.num_layers))
    except ValueError as error:
        raise in_flag_words(error) from None
    if par.world_size % (tp * pp):
        raise ConfigError(
            f"world size {par.world_size} is not divisible by --tensor-model-parallel-size {tp} "
            f"× --pipeline-model-parallel-size {pp} = {tp * pp}"
        )
    # Else torch's "Distributed package doesn't have NCCL built in" traceback from init_process_group.
    if par.distributed_backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise ConfigError(f"--distributed-backend nccl needs CUDA GPUs and a torch built with NCCL; torch "
                          f"{torch.__version__} here has {'no NCCL' if torch.cuda.is_available() else 'no GPU'}: "
                          "drop the flag (gloo is the default without CUDA) or give --distributed-backend gloo")


def validate(config: PretrainConfig) -> None:
    """Arithmetic checks of the flags against each other; raises ``ConfigError`` with one line.
    The model's own checks are ``LlamaConfig``'s (run when it is built) and its ``check_parallel_layout``."""
    m, par, t, s = config.model, config.parallel, config.training, config.lr_schedule
    tp, pp, vstage = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, \
        par.num_layers_per_virtual_pipeline_stage
    _check_parallel_layout(m, par)
    positive = {"--seq-length": t.seq_length, "--micro-batch-size": t.micro_batch_size,
                "--global-batch-size": t.global_batch_size, "--train-iters": t.train_iters,
                "--log-interval": config.logging.log_interval}
    for flag, value in positive.items():
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    dp = par.data_parallel_size
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} × data-parallel size {dp} = {t.micro_batch_size * dp}"
        )
    try:
        sizes = config.batch_schedule.sizes()
    except ValueError as error:
        raise ConfigError(str(error)) from None
    for size in sizes[:-1]:  # the ramp's (the global batch size's own checks are above and below)
        if size % (t.micro_batch_size * dp):
            raise ConfigError(f"--rampup-batch-size reaches a global batch of {size}, not divisible by "
                              f"--micro-batch-size {t.micro_batch_size} × data-parallel size {dp} = "
                              f"{t.micro_batch_size * dp}")
    for size in sizes:
        if vstage is not None and size // (t.micro_batch_size * dp) % pp:
            raise ConfigError(
                f"the interleaved schedule needs the micro-batches per iteration ({size // (t.micro_batch_size * dp)} "
                f"= global batch {size} / (micro batch × data-parallel size)) to be a multiple of "
                f"--pipeline-model-parallel-size {pp}"
            )
    if m.sequence_parallel and t.seq_length % tp:
        raise ConfigError(f"--sequence-parallel needs --seq-length {t.seq_length} divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if t.seq_length > m.max_position_embeddings:
        raise ConfigError(f"--seq-length {t.seq_length} exceeds --max-position-embeddings "
                          f"{m.max_position_embeddings}")
    _check_numeric_ranges(config)
    if not 0 <= s.min_lr <= config.optimizer.lr:
        raise ConfigError(f"--min-lr {s.min_lr} must be between 0 and --lr {config.optimizer.lr}")
    _check_decoupled_lr(config.optimizer, s.min_lr)
    warmup, decay = s.warmup_and_decay_samples(t.global_batch_size)
    if not 0 <= warmup < decay:
        if s.lr_decay_samples is not None or s.lr_warmup_fraction is not None:
            raise ConfigError(f"the lr warmup ({warmup:g} samples, from --lr-warmup-samples or --lr-warmup-fraction) "
                              f"must be at least 0 and below the decay length ({decay} samples, --lr-decay-samples, "
                              "default --train-samples, or --lr-decay-iters × --global-batch-size)")
        raise ConfigError(f"--lr-warmup-iters {s.lr_warmup_iters} must be below --lr-decay-iters "
                          f"{s.lr_decay_iters} (which defaults to --train-iters)")
    if t.num_workers < 0 or t.manual_gc_interval < 0:
        raise ConfigError("--num-workers and --manual-gc-interval must be at least 0")
    if t.profile and not 0 <= t.profile_step_start < t.profile_step_end:
        raise ConfigError(f"--profile needs 0 ≤ --profile-step-start {t.profile_step_start} < "
                          f"--profile-step-end {t.profile_step_end}")
    if t.use_pytorch_profiler and not (t.profile and config.logging.tensorboard_dir):
        raise ConfigError("--use-pytorch-profiler needs --profile and --tensorboard-dir (where its traces go)")
    if t.profile and not all(0 <= r < config.parallel.world_size for r in t.profile_ranks):
        raise ConfigError(f"--profile-ranks {t.profile_ranks}: ranks must be in [0, {config.parallel.world_size})")
    if t.eval_iters < 0 or t.eval_interval < 1:
        raise ConfigError("--eval-iters must be ≥ 0 and --eval-interval ≥ 1")
    ck = config.checkpoint
    if ck.save_interval is not None and (ck.save is None or ck.save_interval < 1):
        raise ConfigError("--save-interval needs --save and must be at least 1")
    if ck.exit_on_missing_checkpoint and ck.allow_no_checkpoint:
        raise ConfigError("--exit-on-missing-checkpoint and --allow-no-checkpoint contradict each other: give one")
    if ck.ckpt_step is not None and ck.load is None:
        raise ConfigError("--ckpt-step needs --load")
    if (t.exit_interval is not None and t.exit_interval < 1) or \
            (t.exit_duration_in_mins is not None and t.exit_duration_in_mins <= 0):
        raise ConfigError("--exit-interval must be at least 1 and --exit-duration-in-mins above 0")
    d = config.data
    if d.mock_data + bool(d.data_path) + bool(d.sft_data_path) + d.separate_split_paths != 1:
        raise ConfigError("give exactly one of --data-path, --mock-data, --sft-data-path and "
                          "--train-data-path (with --valid-data-path/--test-data-path)")
    if d.separate_split_paths and not d.train_data_path:
        raise ConfigError("--valid-data-path/--test-data-path need --train-data-path")
    if d.reset_position_ids != d.reset_attention_mask:
        raise ConfigError("--reset-position-ids and --reset-attention-mask go together (positions restart "
                          "where attention is cut)")
    if d.sft_data_path and (d.reset_position_ids or d.eod_mask_loss):
        raise ConfigError("--sft-data-path packs isolated examples with answer-only loss already: "
                          "drop --reset-position-ids/--reset-attention-mask/--eod-mask-loss")
    if d.mock_data and (d.reset_position_ids or d.eod_mask_loss):
        raise ConfigError("--reset-position-ids/--reset-attention-mask/--eod-mask-loss act on the EOD tokens of "
                          "--data-path, not on --mock-data")
    if ck.finetune and ck.load is None:
        raise ConfigError("--finetune needs --load (the pretrained checkpoint or HF folder)")
    if d.sft_data_path:
        data_prefixes(d.sft_data_path)  # raises on a malformed weight/prefix list
    if d.data_path or d.sft_data_path:  # else a traceback from the dataset builder, after the model was built
        try:
            parse_split(d.split)
        except ValueError as error:
            raise ConfigError(str(error) if str(error).startswith("--split") else f"--split {d.split!r}: {error}") \
                from None
    if d.tokenizer_type in ("SentencePieceTokenizer", "HuggingFaceTokenizer") and not d.tokenizer_model:
        raise ConfigError(f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model")
    for paths in (d.data_path, d.train_data_path, d.valid_data_path, d.test_data_path):
        if paths:
            data_prefixes(paths)  # raises on a malformed weight/prefix list


def _check_numeric_ranges(config: PretrainConfig) -> None:
    """Values torch or numpy would reject with a traceback during set-up (and a negative --lr, which
    the --min-lr check would blame on --min-lr's default)."""
    o = config.optimizer
    for flag, value, ok, wanted in (
            ("--lr", o.lr, o.lr >= 0, "at least 0"),
            ("--weight-decay", o.weight_decay, o.weight_decay >= 0, "at least 0"),
            ("--adam-beta1", o.adam_beta1, 0 <= o.adam_beta1 < 1, "in [0, 1)"),
            ("--adam-beta2", o.adam_beta2, 0 <= o.adam_beta2 < 1, "in [0, 1)"),
            ("--adam-eps", o.adam_eps, o.adam_eps >= 0, "at least 0"),
            ("--clip-grad", o.clip_grad, o.clip_grad >= 0, "at least 0 (0 = off)"),
            ("--init-method-std", config.model.init_method_std, config.model.init_method_std >= 0, "at least 0"),
            ("--seed", config.training.seed, config.training.seed >= 0, "at least 0"),
            ("--distributed-timeout-minutes", config.parallel.distributed_timeout_minutes,
             config.parallel.distributed_timeout_minutes >= 1, "at least 1")):
        if not ok:  # NaN fails every comparison, so it is caught too
            raise ConfigError(f"{flag} must be {wanted}, got {value}")


def _check_decoupled_lr(o: OptimizerConfig, min_lr: float) -> None:
    """The embedding's and output layer's schedule, as the other groups': 0 ≤ floor ≤ peak. Their floor
    without --decoupled-min-lr is --min-lr (megatron-core's ``_get_param_groups``)."""
    for flag, value in (("--decoupled-lr", o.decoupled_lr), ("--decoupled-min-lr", o.decoupled_min_lr)):
        if value is not None and value < 0:
            raise ConfigError(f"{flag} must be at least 0, got {value}")
    if o.decoupled_lr is None:
        return
    if o.decoupled_min_lr is None and min_lr > o.decoupled_lr:
        raise ConfigError(f"--decoupled-lr {o.decoupled_lr} is below its floor --min-lr {min_lr} (the floor "
                          "without --decoupled-min-lr, as Megatron): give --decoupled-min-lr")
    if o.decoupled_min_lr is not None and o.decoupled_min_lr > o.decoupled_lr:
        raise ConfigError(f"--decoupled-min-lr {o.decoupled_min_lr} must not exceed --decoupled-lr {o.decoupled_lr}")


def parse_args(argv: Optional[Sequence[str]] = None, env=None, check_files: bool = True) -> PretrainConfig:
    """Parse and validate the flags; ``env`` (default ``os.environ``) gives the launcher's WORLD_SIZE."""
    env = os.environ if env is None else env
    ns = build_parser().parse_args(argv)
    check_megatron_compatibility_flags(ns, error=ConfigError)
    config = config_from_namespace(ns, _world_size(env))
    validate(config)
    if check_files:
        check_inputs(config, vocab_size_given=ns.vocab_size is not None)
    ignored = ignored_megatron_flags(ns) + ignored_model_flags(ns, config.model)
    if ns.decoupled_min_lr is not None and ns.decoupled_lr is None:  # accepted as Megatron, which ignores it too
        ignored.append("--decoupled-min-lr: it is the floor of --decoupled-lr's param group, and there is no "
                       "--decoupled-lr")
    notes = [f"ignoring Megatron flag {line}" for line in ignored] + \
        (sft_truncation_notices(config) if check_files else [])
    if notes and env.get("RANK", "0") == "0":  # once for the whole job
        print("\n".join(f"megallama.pretrain: {note}" for note in notes), flush=True)
    return config
