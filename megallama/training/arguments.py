"""Command-line flags of ``megallama.pretrain`` → a validated ``PretrainConfig``.

Flags keep Megatron-LM's names so launch scripts carry over. Defaults are the LLaMA paper's
(AdamW β = (0.9, 0.95), weight decay 0.1, clipping 1.0, 2000 warmup iterations, cosine decay to 10%
of the peak lr). Every check that can fail is done here, before any process group or tensor exists,
and by every rank alike: a bad configuration stops all ranks with the same one-line message instead
of hanging some of them in a collective.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from megallama.config import LlamaConfig, llama_ffn_hidden_size
from megallama.training.config import (
    PAPER_PEAK_LR,
    CheckpointArgs,
    DataArgs,
    LoggingArgs,
    LRScheduleArgs,
    ModelArgs,
    OptimizerArgs,
    ParallelArgs,
    PretrainConfig,
    TrainingArgs,
)

DECAY_STYLES = ("cosine", "linear", "constant")
TOKENIZER_TYPES = ("SentencePieceTokenizer", "NullTokenizer")
# Megatron's other names for a SentencePiece model, accepted so launch scripts carry over.
SENTENCEPIECE_ALIASES = ("GPTSentencePieceTokenizer", "Llama2Tokenizer")


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the flags and numbers."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megallama.pretrain",
        description="Pretrain a LLaMA model. Launch with `torchrun [torchrun flags] -m megallama.pretrain "
        "[flags]`; a plain `python -m megallama.pretrain` runs a single process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model shape")
    g.add_argument("--model-size", choices=sorted(PAPER_PEAK_LR), default=None,
                   help="Take the paper's shape (Table 2) and peak lr; explicit shape flags override it.")
    g.add_argument("--num-layers", type=int, default=None, help="Number of transformer layers.")
    g.add_argument("--hidden-size", type=int, default=None, help="Model width (the paper's dim).")
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="SwiGLU FFN width; default 2/3·4·hidden rounded up to a multiple of 256, as LLaMA.")
    g.add_argument("--num-attention-heads", type=int, default=None, help="Number of attention heads.")
    g.add_argument("--seq-length", type=int, default=2048, help="Tokens per training sequence.")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="Longest sequence the rotary table covers; default --seq-length.")
    g.add_argument("--norm-epsilon", type=float, default=1e-6, help="RMSNorm epsilon (Meta's params.json).")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="Embedding rows; default the tokenizer's vocabulary (32000 with NullTokenizer). "
                   "Must not be smaller than the tokenizer's vocabulary.")
    g.add_argument("--init-method-std", type=float, default=0.02, help="Std of the normal weight init.")
    g.add_argument("--rotary-base", type=float, default=10000.0, help="RoPE theta (base of the rotary frequencies).")

    g = p.add_argument_group("Megatron architecture flags (accepted so scripts carry over; LLaMA is fixed)")
    for flag in ("--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
                 "--no-position-embedding", "--use-rotary-position-embeddings"):
        g.add_argument(flag, action="store_true", help="Always on in LLaMA; accepted and ignored.")
    g.add_argument("--normalization", choices=["RMSNorm"], default="RMSNorm", help="LLaMA uses RMSNorm.")
    g.add_argument("--position-embedding-type", choices=["rope"], default="rope", help="LLaMA uses RoPE.")
    g.add_argument("--attention-dropout", type=float, default=0.0, help="LLaMA has no dropout: must be 0.")
    g.add_argument("--hidden-dropout", type=float, default=0.0, help="LLaMA has no dropout: must be 0.")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="Ranks each layer's matmuls are split over (heads and FFN columns).")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="Pipeline stages the layer stack is split into.")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="Layers per model chunk for the interleaved 1F1B schedule; unset = plain 1F1B.")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Shard norm regions' activations along the sequence over the tensor-parallel ranks.")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Shard fp32 main weights and AdamW state over data-parallel ranks (ZeRO-1).")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="torch.distributed backend; default nccl with CUDA, else gloo.")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="Collective timeout, so a failed rank stops the others instead of hanging them.")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1, help="Sequences per forward pass on one rank.")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Sequences per optimizer step over all ranks (the paper: 4M tokens = 2048 × 2048); "
                   "default micro-batch × data-parallel size.")
    g.add_argument("--train-iters", type=int, required=True, help="Optimizer steps to train for.")
    g.add_argument("--seed", type=int, default=1234, help="Seed of initialisation and data order.")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 parameters and activations with fp32 main weights and fp32 gradient accumulation.")
    g.add_argument("--recompute-granularity", choices=["selective", "full"], default=None,
                   help="Recompute activations in backward: selective = attention core only, full = whole layers.")
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

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--lr", type=float, default=None,
                   help="Peak learning rate; default the paper's for --model-size (3e-4 at 7B/13B, 1.5e-4 at "
                   "33B/65B), else 3e-4.")
    g.add_argument("--min-lr", type=float, default=None, help="Floor of the decay; default 10%% of --lr.")
    g.add_argument("--lr-decay-style", choices=DECAY_STYLES, default="cosine", help="Shape of the decay.")
    g.add_argument("--lr-warmup-iters", type=int, default=2000, help="Iterations of linear warmup from 0.")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="Iteration at which the lr reaches --min-lr; default --train-iters.")
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
    g.add_argument("--mock-data", action="store_true",
                   help="Deterministic synthetic tokens indexed by global sample number (tests, benchmarks).")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES + SENTENCEPIECE_ALIASES, default=None,
                   help="Default SentencePieceTokenizer when --tokenizer-model is given, else NullTokenizer "
                   "(Megatron's GPTSentencePieceTokenizer and Llama2Tokenizer mean SentencePieceTokenizer).")
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece .model file.")
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
    return p


def _world_size(env) -> int:
    return int(env.get("WORLD_SIZE", "1"))


def config_from_namespace(ns: argparse.Namespace, world_size: int) -> PretrainConfig:
    """Fill the defaults that depend on other flags and group the flags into a ``PretrainConfig``."""
    preset = LlamaConfig.preset(ns.model_size) if ns.model_size else None
    shape = {}
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        value = getattr(ns, name)
        shape[name] = value if value is not None else getattr(preset, name, None)
        if shape[name] is None:
            raise ConfigError(f"--{name.replace('_', '-')} is required when --model-size is not given")
    ffn = ns.ffn_hidden_size if ns.ffn_hidden_size is not None else llama_ffn_hidden_size(shape["hidden_size"])

    tokenizer_type = ns.tokenizer_type or ("SentencePieceTokenizer" if ns.tokenizer_model else "NullTokenizer")
    if tokenizer_type in SENTENCEPIECE_ALIASES:
        tokenizer_type = "SentencePieceTokenizer"
    vocab_size = ns.vocab_size
    if vocab_size is None and tokenizer_type == "NullTokenizer":
        vocab_size = 32000
    lr = ns.lr if ns.lr is not None else PAPER_PEAK_LR.get(ns.model_size, 3.0e-4)
    parallel = ParallelArgs(
        tensor_model_parallel_size=ns.tensor_model_parallel_size,
        pipeline_model_parallel_size=ns.pipeline_model_parallel_size,
        num_layers_per_virtual_pipeline_stage=ns.num_layers_per_virtual_pipeline_stage,
        sequence_parallel=ns.sequence_parallel,
        use_distributed_optimizer=ns.use_distributed_optimizer,
        world_size=world_size,
        distributed_backend=ns.distributed_backend,
        distributed_timeout_minutes=ns.distributed_timeout_minutes,
    )
    _check_parallel_layout(parallel, shape["num_layers"])
    global_batch = ns.global_batch_size or ns.micro_batch_size * parallel.data_parallel_size
    return PretrainConfig(
        model=ModelArgs(
            num_layers=shape["num_layers"], hidden_size=shape["hidden_size"],
            num_attention_heads=shape["num_attention_heads"], ffn_hidden_size=ffn,
            seq_length=ns.seq_length, max_position_embeddings=ns.max_position_embeddings or ns.seq_length,
            norm_epsilon=ns.norm_epsilon, vocab_size=vocab_size if vocab_size is not None else 0,
            init_method_std=ns.init_method_std, rope_theta=ns.rotary_base,
        ),
        parallel=parallel,
        optimizer=OptimizerArgs(
            weight_decay=ns.weight_decay, adam_beta1=ns.adam_beta1, adam_beta2=ns.adam_beta2,
            adam_eps=ns.adam_eps, clip_grad=ns.clip_grad,
        ),
        lr_schedule=LRScheduleArgs(
            lr=lr, min_lr=ns.min_lr if ns.min_lr is not None else 0.1 * lr,
            lr_decay_style=ns.lr_decay_style, lr_warmup_iters=ns.lr_warmup_iters,
            lr_decay_iters=ns.lr_decay_iters if ns.lr_decay_iters is not None else ns.train_iters,
        ),
        training=TrainingArgs(
            micro_batch_size=ns.micro_batch_size, global_batch_size=global_batch, train_iters=ns.train_iters,
            seed=ns.seed, bf16=ns.bf16, recompute_granularity=ns.recompute_granularity,
            eval_interval=ns.eval_interval, eval_iters=ns.eval_iters,
            exit_signal_handler=ns.exit_signal_handler if ns.exit_signal_handler is not None else ns.save is not None,
            exit_duration_in_mins=ns.exit_duration_in_mins, exit_interval=ns.exit_interval,
        ),
        data=DataArgs(
            data_path=list(ns.data_path), split=ns.split, mock_data=ns.mock_data,
            tokenizer_type=tokenizer_type, tokenizer_model=ns.tokenizer_model,
            data_cache_path=ns.data_cache_path, sft_data_path=list(ns.sft_data_path),
            reset_position_ids=ns.reset_position_ids, reset_attention_mask=ns.reset_attention_mask,
            eod_mask_loss=ns.eod_mask_loss,
        ),
        checkpoint=CheckpointArgs(
            save=ns.save, load=ns.load, save_interval=ns.save_interval, ckpt_step=ns.ckpt_step,
            no_load_optim=ns.no_load_optim, no_load_rng=ns.no_load_rng, finetune=ns.finetune,
            allow_no_checkpoint=ns.allow_no_checkpoint, rewind_save=ns.rewind_save,
        ),
        logging=LoggingArgs(log_interval=ns.log_interval, tensorboard_dir=ns.tensorboard_dir,
                            peak_tflops=ns.peak_tflops),
    )


def _check_parallel_layout(par: ParallelArgs, num_layers: int) -> None:
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    for name, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if par.world_size % (tp * pp):
        raise ConfigError(
            f"world size {par.world_size} is not divisible by --tensor-model-parallel-size {tp} "
            f"× --pipeline-model-parallel-size {pp} = {tp * pp}"
        )


def validate(config: PretrainConfig) -> None:
    """Arithmetic checks of the flags against each other; raises ``ConfigError`` with one line."""
    m, par, t, s = config.model, config.parallel, config.training, config.lr_schedule
    tp, pp, vstage = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, \
        par.num_layers_per_virtual_pipeline_stage
    _check_parallel_layout(par, m.num_layers)
    positive = {"--num-layers": m.num_layers, "--hidden-size": m.hidden_size,
                "--num-attention-heads": m.num_attention_heads, "--ffn-hidden-size": m.ffn_hidden_size,
                "--seq-length": m.seq_length, "--micro-batch-size": t.micro_batch_size,
                "--global-batch-size": t.global_batch_size, "--train-iters": t.train_iters,
                "--log-interval": config.logging.log_interval}
    for flag, value in positive.items():
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
                          f"{m.num_attention_heads}")
    if (m.hidden_size // m.num_attention_heads) % 2:
        raise ConfigError(f"head size {m.hidden_size // m.num_attention_heads} (--hidden-size / "
                          "--num-attention-heads) must be even for rotary embeddings")
    if m.num_attention_heads % tp:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if m.ffn_hidden_size % tp:
        raise ConfigError(f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if vstage is None:
        if m.num_layers % pp:
            raise ConfigError(f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    else:
        if pp < 2:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size ≥ 2")
        if vstage < 1 or m.num_layers % (pp * vstage):
            raise ConfigError(
                f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size {pp} "
                f"× --num-layers-per-virtual-pipeline-stage {vstage} = {pp * vstage}"
            )
    dp = par.data_parallel_size
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
            f"{t.micro_batch_size} × data-parallel size {dp} = {t.micro_batch_size * dp}"
        )
    if vstage is not None and config.num_micro_batches % pp:
        raise ConfigError(
            f"the interleaved schedule needs the micro-batches per iteration ({config.num_micro_batches} = "
            f"global batch / (micro batch × data-parallel size)) to be a multiple of "
            f"--pipeline-model-parallel-size {pp}"
        )
    if par.sequence_parallel and m.seq_length % tp:
        raise ConfigError(f"--sequence-parallel needs --seq-length {m.seq_length} divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if m.seq_length > m.max_position_embeddings:
        raise ConfigError(f"--seq-length {m.seq_length} exceeds --max-position-embeddings "
                          f"{m.max_position_embeddings}")
    if not 0 <= s.min_lr <= s.lr:
        raise ConfigError(f"--min-lr {s.min_lr} must be between 0 and --lr {s.lr}")
    if s.lr_warmup_iters < 0 or s.lr_warmup_iters >= s.lr_decay_iters:
        raise ConfigError(f"--lr-warmup-iters {s.lr_warmup_iters} must be below --lr-decay-iters "
                          f"{s.lr_decay_iters} (which defaults to --train-iters)")
    if t.eval_iters < 0 or t.eval_interval < 1:
        raise ConfigError("--eval-iters must be ≥ 0 and --eval-interval ≥ 1")
    ck = config.checkpoint
    if ck.save_interval is not None and (ck.save is None or ck.save_interval < 1):
        raise ConfigError("--save-interval needs --save and must be at least 1")
    if ck.ckpt_step is not None and ck.load is None:
        raise ConfigError("--ckpt-step needs --load")
    if (t.exit_interval is not None and t.exit_interval < 1) or \
            (t.exit_duration_in_mins is not None and t.exit_duration_in_mins <= 0):
        raise ConfigError("--exit-interval must be at least 1 and --exit-duration-in-mins above 0")
    d = config.data
    if d.mock_data + bool(d.data_path) + bool(d.sft_data_path) != 1:
        raise ConfigError("give exactly one of --data-path, --mock-data and --sft-data-path")
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
        data_prefixes(d.sft_data_path)
    if d.tokenizer_type == "SentencePieceTokenizer" and not d.tokenizer_model:
        raise ConfigError("--tokenizer-type SentencePieceTokenizer needs --tokenizer-model")
    if d.data_path:
        data_prefixes(d.data_path)  # raises on a malformed weight/prefix list


def data_prefixes(data_path: Sequence[str]) -> list[tuple[float, str]]:
    """``--data-path`` as (weight, prefix) pairs: ``PREFIX`` alone or ``W1 PREFIX1 W2 PREFIX2 …``."""
    if len(data_path) == 1:
        return [(1.0, data_path[0])]
    if len(data_path) % 2:
        raise ConfigError(f"--data-path with several datasets takes weight/prefix pairs, got {len(data_path)} words")
    pairs = []
    for weight, prefix in zip(data_path[0::2], data_path[1::2]):
        try:
            pairs.append((float(weight), prefix))
        except ValueError:
            raise ConfigError(f"--data-path weight {weight!r} (before {prefix!r}) is not a number") from None
    return pairs


def sentencepiece_vocab_size(model_file: str) -> int:
    from megallama.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(model_file).vocab_size


def check_inputs(config: PretrainConfig) -> None:
    """Checks against the filesystem: data files and tokenizer exist, the vocabulary fits.

    Fills ``model.vocab_size`` from the tokenizer when ``--vocab-size`` was not given.
    """
    d = config.data
    for _, prefix in data_prefixes(d.data_path) if d.data_path else []:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ConfigError(f"data file {prefix + ext} not found (from --data-path {prefix})")
    for _, prefix in data_prefixes(d.sft_data_path) if d.sft_data_path else []:
        from megallama.data.instructions import output_prefixes

        for path in (p + ext for p in output_prefixes(prefix) for ext in (".bin", ".idx")):
            if not os.path.isfile(path):
                raise ConfigError(f"instruction data file {path} not found (from --sft-data-path {prefix}; "
                                  "made by tools/preprocess_instructions.py)")
    if d.tokenizer_type == "SentencePieceTokenizer":
        if not os.path.isfile(d.tokenizer_model):
            raise ConfigError(f"tokenizer model {d.tokenizer_model} not found (--tokenizer-model)")
        vocab = sentencepiece_vocab_size(d.tokenizer_model)
        if config.model.vocab_size == 0:
            config.model.vocab_size = vocab
        elif vocab > config.model.vocab_size:
            raise ConfigError(f"tokenizer {d.tokenizer_model} has {vocab} tokens, more than --vocab-size "
                              f"{config.model.vocab_size}")
    check_checkpoint_folders(config.checkpoint)


def _same_folder(a: Optional[str], b: Optional[str]) -> bool:
    return a is not None and b is not None and os.path.realpath(a) == os.path.realpath(b)


def check_checkpoint_folders(ck: CheckpointArgs) -> None:
    """A ``--load`` naming no checkpoint is a mistyped path unless it is the ``--save`` folder
    (resume-or-start) or ``--allow-no-checkpoint`` says so; a run starting below the iteration
    ``--save`` already holds would rewind that folder's tracker, unless ``--rewind-save``."""
    from megallama.training.checkpointing import CheckpointError, read_tracker

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


def parse_args(argv: Optional[Sequence[str]] = None, env=None, check_files: bool = True) -> PretrainConfig:
    """Parse and validate the flags; ``env`` (default ``os.environ``) gives the launcher's WORLD_SIZE."""
    env = os.environ if env is None else env
    ns = build_parser().parse_args(argv)
    if ns.attention_dropout != 0.0 or ns.hidden_dropout != 0.0:
        raise ConfigError("LLaMA has no dropout: --attention-dropout and --hidden-dropout must be 0")
    config = config_from_namespace(ns, _world_size(env))
    validate(config)
    if check_files:
        check_inputs(config)
    return config
