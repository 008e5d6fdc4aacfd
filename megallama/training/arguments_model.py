"""The model-shape flags of ``megallama.pretrain`` → a ``LlamaConfig`` (Megatron-LM's names and meanings).

``--model-size`` takes a preset of ``megallama.config`` (LLaMA-1's Table 2, LLaMA-2/3/3.2); each
explicit shape flag overrides its field. Where Megatron reads the absence of a flag as a choice
(no ``--untie-embeddings-and-output-weights`` = tied embeddings, no ``--group-query-attention`` =
one K/V head per query head), explicit shapes follow Megatron and a preset decides for itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Optional

import torch

from megallama.config import _PRESETS, LlamaConfig, RopeScaling


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the flags and numbers."""


# The names in the model's and the pipeline's errors are the flags' with underscores, but for these.
_FLAG_OF = {"rope_theta": "rotary_base"}
_NAMED = "|".join([f.name for f in dataclasses.fields(LlamaConfig)] + [
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage"])

# Megatron's --use-rope-scaling is LLaMA-3.1's scaling with its fixed constants (only the factor is a flag).
MEGATRON_ROPE_SCALING = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
LLAMA_NORM_EPSILON, LLAMA_ROTARY_BASE = 1e-6, 10000.0
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows a flag's default where it is a value: an unset flag (None) has its meaning in its
    help ("default --seq-length", "default the preset's"), which "(default: None)" would contradict, and
    a switch (False) or an empty list is just off."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def in_flag_words(error: ValueError) -> ConfigError:
    """A ``LlamaConfig`` or layout error worded as the flags: ``LlamaConfig.num_layers`` → ``--num-layers``,
    ``num_layers (4)`` → ``--num-layers 4``."""
    def flag(match: re.Match) -> str:
        name = "--" + _FLAG_OF.get(match[1], match[1]).replace("_", "-")
        return f"{name} {match[2]}" if match[2] else name

    message = re.sub(r"LlamaConfig(\.|: )", "", str(error))
    return ConfigError(re.sub(rf"\b({_NAMED})\b(?: \(([^()]*)\))?", flag, message))


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model shape")
    g.add_argument("--model-size", choices=sorted(_PRESETS), default=None,
                   help="Take a preset's shape (LLaMA-1's Table 2, LLaMA-2/3/3.2) and, for LLaMA-1 sizes, the "
                   "paper's peak lr; explicit shape flags override its fields. The preset decides tied "
                   "embeddings (LLaMA-1/2 untied), grouped-query attention and RoPE scaling unless the flags say.")
    g.add_argument("--num-layers", type=int, default=None, help="Number of transformer layers.")
    g.add_argument("--hidden-size", type=int, default=None, help="Model width (the paper's dim).")
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="SwiGLU FFN width; default the preset's, else 2/3·4·hidden rounded up to a multiple of 256, "
                   "as LLaMA.")
    g.add_argument("--num-attention-heads", type=int, default=None, help="Number of attention (query) heads.")
    g.add_argument("--group-query-attention", action="store_true",
                   help="Grouped-query attention with --num-query-groups K/V heads (Megatron's flag; without it "
                   "and without a preset, every query head has its own K/V head).")
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="K/V heads with --group-query-attention (Megatron's default there: 1); read only with "
                   "--group-query-attention, as in Megatron.")
    g.add_argument("--kv-channels", type=int, default=None,
                   help="Per-head projection size; default --hidden-size / --num-attention-heads.")
    g.add_argument("--seq-length", type=int, default=2048, help="Tokens per training sequence.")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="Longest sequence the rotary table covers; default --seq-length.")
    g.add_argument("--norm-epsilon", type=float, default=None,
                   help=f"RMSNorm epsilon; default the preset's, else {LLAMA_NORM_EPSILON} (Meta's params.json).")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="Embedding rows; default the tokenizer's vocabulary (32000 with NullTokenizer). "
                   "Must not be smaller than the tokenizer's vocabulary.")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="Pad the embedding rows (the vocabulary size above) up to a multiple of this × "
                   "--tensor-model-parallel-size, as Megatron (whose default is 128). Without the flag "
                   "megallama pads nothing, so existing runs keep their vocabulary size and checkpoints.")
    g.add_argument("--init-method-std", type=float, default=0.02, help="Std of the normal weight init.")
    g.add_argument("--rotary-base", type=float, default=None,
                   help="RoPE theta (base of the rotary frequencies); default the preset's, else "
                   f"{LLAMA_ROTARY_BASE:g}.")
    g.add_argument("--rotary-percent", type=float, default=1.0,
                   help="Fraction of each head rotated by RoPE; LLaMA rotates the whole head, so only 1.0.")
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="LLaMA-3.1's RoPE frequency scaling (Megatron's flag: low/high frequency factors 1 and 4, "
                   "original context 8192); default the preset's (none for explicit shapes).")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0,
                   help="Scaling factor with --use-rope-scaling (Megatron's default 8).")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="Separate output-layer weights. Without it explicit shapes tie the output layer to the "
                   "embedding, as Megatron (LLaMA-1/2 are untied: give this flag); with --model-size the preset "
                   "decides (LLaMA-1/2 and 3-8B/70B untied, 3.2-1B/3B tied) and this flag unties any.")

    g = p.add_argument_group("Megatron architecture and kernel flags")
    for flag, why in (("--swiglu", "LLaMA's MLP is always SwiGLU"),
                      ("--disable-bias-linear", "LLaMA's linear layers have no biases"),
                      ("--no-position-embedding", "LLaMA has no learned position table"),
                      ("--use-rotary-position-embeddings", "LLaMA always uses RoPE"),
                      ("--use-mcore-models", "megallama has one model implementation (deprecated in Megatron too)")):
        g.add_argument(flag, action="store_true", help=f"Accepted; always so here: {why}.")
    g.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"], default="RMSNorm",
                   help="LLaMA uses RMSNorm; LayerNorm is refused.")
    g.add_argument("--position-embedding-type", choices=["rope"], default="rope", help="LLaMA uses RoPE.")
    g.add_argument("--attention-dropout", type=float, default=0.0, help="LLaMA has no dropout: must be 0.")
    g.add_argument("--hidden-dropout", type=float, default=0.0, help="LLaMA has no dropout: must be 0.")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="Kernels torch's scaled_dot_product_attention may pick: auto = any; flash = "
                   "FlashAttention only; fused = the fused ones (flash, memory-efficient, cuDNN); unfused and "
                   "local = the plain math kernel (on CPU torch has its CPU flash kernel and the math one). "
                   "Packed documents (--reset-attention-mask, --sft-data-path) go through FlexAttention instead, "
                   "which this flag does not change.")
    g.add_argument("--use-flash-attn", action="store_true",
                   help="Megatron's older spelling of --attention-backend flash.")
    g.add_argument("--no-masked-softmax-fusion", action="store_true",
                   help="Accepted: there is no separate scale+mask+softmax kernel here; masking and softmax happen "
                   "inside the attention kernel, whatever this flag says.")
    g.add_argument("--attention-softmax-in-fp32", action="store_true",
                   help="Accepted; always so here: the attention kernels keep the softmax statistics in fp32.")
    g.add_argument("--recompute-granularity", choices=["selective", "full"], default=None,
                   help="Recompute activations in backward: selective = attention core only, full = whole layers.")
    g.add_argument("--recompute-activations", action="store_true",
                   help="Megatron's shorthand for --recompute-granularity selective.")


def padded_vocab_size(vocab_size: int, divisible_by: Optional[int], tensor_model_parallel_size: int) -> int:
    """Megatron's ``_vocab_size_with_padding``: up to a multiple of ``divisible_by`` × TP (None: unchanged)."""
    if divisible_by is None:
        return vocab_size
    multiple = divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def model_from_namespace(ns: argparse.Namespace) -> LlamaConfig:
    """The ``LlamaConfig`` the model flags describe (vocabulary padded with --make-vocab-size-divisible-by)."""
    if ns.normalization != "RMSNorm":
        raise ConfigError(f"--normalization {ns.normalization}: LLaMA uses RMSNorm; megallama has no LayerNorm")
    if ns.rotary_percent != 1.0:
        raise ConfigError(f"--rotary-percent {ns.rotary_percent}: LLaMA applies rotary embeddings to the whole "
                          "head; megallama supports only 1.0")
    if ns.attention_dropout != 0.0 or ns.hidden_dropout != 0.0:
        raise ConfigError("LLaMA has no dropout: --attention-dropout and --hidden-dropout must be 0")
    if ns.make_vocab_size_divisible_by is not None and ns.make_vocab_size_divisible_by < 1:
        raise ConfigError(f"--make-vocab-size-divisible-by must be at least 1, got {ns.make_vocab_size_divisible_by}")
    if ns.recompute_activations and ns.recompute_granularity not in (None, "selective"):
        raise ConfigError("--recompute-activations means --recompute-granularity selective; drop one of them")
    # The preset as written (its unset fields unresolved: a head size or K/V head count derived
    # from the preset's width must not survive an explicit --hidden-size or --num-attention-heads).
    preset = _PRESETS[ns.model_size] if ns.model_size else {}
    fields = {}
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        fields[name] = getattr(ns, name) if getattr(ns, name) is not None else preset.get(name)
        if fields[name] is None:
            raise ConfigError(f"--{name.replace('_', '-')} is required when --model-size is not given")
    explicit = {"ffn_hidden_size": ns.ffn_hidden_size, "kv_channels": ns.kv_channels,
                "norm_epsilon": ns.norm_epsilon, "rope_theta": ns.rotary_base,
                "num_query_groups": (ns.num_query_groups or 1) if ns.group_query_attention else None}
    # Fields the flags leave open come from the preset, else LLaMA's (or Megatron's) meaning of no flag.
    llama = {"ffn_hidden_size": None, "kv_channels": None, "norm_epsilon": LLAMA_NORM_EPSILON,
             "rope_theta": LLAMA_ROTARY_BASE, "num_query_groups": None}
    for name, value in explicit.items():
        fields[name] = value if value is not None else preset.get(name, llama[name])
    if ns.hidden_size is not None and ns.ffn_hidden_size is None:
        fields["ffn_hidden_size"] = None  # a new width gets LLaMA's FFN width for it, not the preset's
    # Megatron ties the output layer to the embedding unless told otherwise; a preset says for itself.
    tied = preset.get("tie_word_embeddings", False) if preset else True
    rope_scaling = RopeScaling(factor=ns.rope_scaling_factor, **MEGATRON_ROPE_SCALING) if ns.use_rope_scaling \
        else preset.get("rope_scaling")
    tp = ns.tensor_model_parallel_size
    try:
        return LlamaConfig(
            **fields,
            vocab_size=padded_vocab_size(32000 if ns.vocab_size is None else ns.vocab_size,
                                         ns.make_vocab_size_divisible_by, tp),
            max_position_embeddings=ns.max_position_embeddings or ns.seq_length,
            init_method_std=ns.init_method_std,
            rope_scaling=rope_scaling,
            tie_word_embeddings=tied and not ns.untie_embeddings_and_output_weights,
            # Sequence parallelism splits the sequence over the tensor-parallel ranks: none to split over at TP 1.
            sequence_parallel=ns.sequence_parallel and tp > 1,
            recompute_granularity="selective" if ns.recompute_activations else ns.recompute_granularity,
            params_dtype=torch.bfloat16 if ns.bf16 else torch.float32)
    except ValueError as error:
        raise in_flag_words(error) from None


def ignored_model_flags(ns: argparse.Namespace, model: LlamaConfig) -> list[str]:
    """Model flags given that change nothing, each ``--FLAG: why`` (the run says so instead of running
    other than asked without a word)."""
    ignored = []
    if ns.sequence_parallel and not model.sequence_parallel:  # as Megatron, which disables it at TP 1
        ignored.append("--sequence-parallel: it splits the sequence over the tensor-parallel ranks, and "
                       "--tensor-model-parallel-size is 1")
    if ns.num_query_groups is not None and not ns.group_query_attention:
        ignored.append(f"--num-query-groups {ns.num_query_groups}: it is read only with --group-query-attention "
                       f"(as Megatron); the model has {model.num_query_groups} K/V heads")
    return ignored
