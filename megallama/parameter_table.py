"""Every parameter of the LLaMA model, once: the table the model, the parallel layers, checkpoints
and the HF/Meta converters all read.

An entry gives a parameter's full shape, how tensor parallelism splits it (``TensorSplit``: the
dimension, the fused parts each split separately, vocabulary padding), how it is initialised, the
HF and Meta tensors it is made of (stacked along dim 0, one per part), the dimension Meta's
``consolidated.NN.pth`` files split it along, and which of those parts have their rows in Meta's
interleaved rotary order. Nothing else spells a parameter name or a split rule.

Fused weights: ``attention.wqkv`` holds the rows of Meta's ``wq``, ``wk``, ``wv`` one after the
other and ``feed_forward.w13`` those of ``w1`` then ``w3``, so each is one matrix multiply.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megallama.config import LlamaConfig
from megallama.parallel.split import TensorSplit

# How ``LlamaModel.reset_parameters`` draws a parameter.
INIT_NORMAL = "normal"  # N(0, init_method_std)
INIT_SCALED_NORMAL = "scaled_normal"  # N(0, init_method_std / sqrt(2 · layers)): projections into the residual
INIT_ONES = "ones"  # norms

# HF tensors with no parameter behind them (a cache of rotary frequencies some versions save).
HF_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    shape: tuple[int, ...]
    split: TensorSplit | None  # None: every tensor-parallel rank holds all of it
    init: str
    hf: tuple[str, ...]
    meta: tuple[str, ...]
    meta_split_dim: int | None  # None: repeated in every consolidated.NN.pth
    meta_rotary: tuple[bool, ...]  # per part: rows of each head in Meta's interleaved rotary order
    hf_copies: tuple[str, ...] = ()  # HF tensors that, where present, repeat this one (a tied head)
    # A copy of another parameter, stored (checkpoints, converters) only under that one's name: the
    # tied head of a last pipeline stage that does not hold the embedding.
    stored_as: str | None = None

    @property
    def parts(self) -> tuple[int, ...]:
        """Sizes along dim 0 of the HF/Meta tensors stacked into this parameter."""
        if self.split is not None and self.split.dim == 0:
            return self.split.parts
        return (self.shape[0],)


def _layer_specs(config: LlamaConfig, i: int) -> list[ParameterSpec]:
    h, f, d = config.hidden_size, config.ffn_hidden_size, config.head_dim
    heads, groups = config.num_attention_heads, config.num_query_groups
    q_rows, kv_rows = heads * d, groups * d
    ours, hf, meta = f"layers.{i}.", f"model.layers.{i}.", f"layers.{i}."
    norm = dict(split=None, init=INIT_ONES, meta_split_dim=None, meta_rotary=(False,))
    return [
        ParameterSpec(ours + "attention_norm.weight", (h,), hf=(hf + "input_layernorm.weight",),
                      meta=(meta + "attention_norm.weight",), **norm),
        ParameterSpec(ours + "attention.wqkv.weight", (q_rows + 2 * kv_rows, h),
                      # whole heads per rank; fewer key/value heads than ranks are replicated
                      split=TensorSplit(0, (q_rows, kv_rows, kv_rows), units=(heads, groups, groups)),
                      init=INIT_NORMAL,
                      hf=tuple(f"{hf}self_attn.{x}_proj.weight" for x in "qkv"),
                      meta=tuple(f"{meta}attention.w{x}.weight" for x in "qkv"),
                      meta_split_dim=0, meta_rotary=(True, True, False)),
        ParameterSpec(ours + "attention.wo.weight", (h, q_rows), split=TensorSplit(1, (q_rows,)),
                      init=INIT_SCALED_NORMAL, hf=(hf + "self_attn.o_proj.weight",),
                      meta=(meta + "attention.wo.weight",), meta_split_dim=1, meta_rotary=(False,)),
        ParameterSpec(ours + "ffn_norm.weight", (h,), hf=(hf + "post_attention_layernorm.weight",),
                      meta=(meta + "ffn_norm.weight",), **norm),
        ParameterSpec(ours + "feed_forward.w13.weight", (2 * f, h), split=TensorSplit(0, (f, f)),
                      init=INIT_NORMAL, hf=(hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                      meta=(meta + "feed_forward.w1.weight", meta + "feed_forward.w3.weight"),
                      meta_split_dim=0, meta_rotary=(False, False)),
        ParameterSpec(ours + "feed_forward.w2.weight", (h, f), split=TensorSplit(1, (f,)),
                      init=INIT_SCALED_NORMAL, hf=(hf + "mlp.down_proj.weight",),
                      meta=(meta + "feed_forward.w2.weight",), meta_split_dim=1, meta_rotary=(False,)),
    ]


def parameter_table(config: LlamaConfig, layer_ids=None, pre_process: bool = True,
                    post_process: bool = True) -> dict[str, ParameterSpec]:
    """The parameters of the model (or of one pipeline stage: its layers, and the embedding and
    head where it holds them), in model order: embedding, layer by layer, final norm, head. With
    ``tie_word_embeddings`` the head multiplies by the embedding: there is no ``output.weight``,
    unless the head's stage lacks the embedding (pipeline parallelism), where ``output.weight`` is
    a copy of it, ``stored_as`` the embedding (Megatron's shared embedding on the last stage)."""
    h, v, tied = config.hidden_size, config.vocab_size, config.tie_word_embeddings
    layer_ids = range(config.num_layers) if layer_ids is None else layer_ids
    embedding = ParameterSpec("tok_embeddings.weight", (v, h), split=TensorSplit(0, (v,), pad_to_tp=True),
                              init=INIT_NORMAL, hf=("model.embed_tokens.weight",), meta=("tok_embeddings.weight",),
                              meta_split_dim=1, meta_rotary=(False,), hf_copies=("lm_head.weight",) if tied else ())
    specs = []
    if pre_process:
        specs.append(embedding)
    for i in layer_ids:
        specs += _layer_specs(config, i)
    if post_process:
        specs.append(ParameterSpec("norm.weight", (h,), split=None, init=INIT_ONES, hf=("model.norm.weight",),
                                   meta=("norm.weight",), meta_split_dim=None, meta_rotary=(False,)))
    if post_process and tied and not pre_process:
        specs.append(dataclasses.replace(embedding, name="output.weight", stored_as=embedding.name))
    if post_process and not tied:
        specs.append(ParameterSpec("output.weight", (v, h), split=TensorSplit(0, (v,), pad_to_tp=True),
                                   init=INIT_NORMAL, hf=("lm_head.weight",), meta=("output.weight",),
                                   meta_split_dim=0, meta_rotary=(False,)))
    return {spec.name: spec for spec in specs}


def hf_to_ours(table: dict[str, ParameterSpec], hf: dict) -> dict:
    """A ``LlamaForCausalLM`` state dict under our names (fused parts stacked); an HF tensor the
    table has no place for is an error."""
    known = {name for spec in table.values() for name in spec.hf + spec.hf_copies}
    unexpected = [k for k in hf if k not in known and not k.endswith(HF_IGNORED_SUFFIXES)]
    if unexpected:
        raise KeyError(f"unexpected HF tensors {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
    out = {}
    for name, spec in table.items():
        if all(n in hf for n in spec.hf):
            parts = [hf[n] for n in spec.hf]
            out[name] = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out


def ours_to_hf(table: dict[str, ParameterSpec], ours: dict) -> dict:
    """Our tensors under ``LlamaForCausalLM``'s names (fused parts split out)."""
    out = {}
    for name, tensor in ours.items():
        if name not in table:
            raise KeyError(f"unexpected megallama tensor {name!r}")
        spec = table[name]
        out.update(zip(spec.hf, tensor.split(spec.parts)))
    return out
