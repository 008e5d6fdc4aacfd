"""The LLaMA network (Touvron et al. 2023), readable top to bottom, in the paper's names.

Pre-norm RMSNorm, SwiGLU feed-forward, rotary embeddings on q and k, no biases, untied output
head. Causal attention goes through ``scaled_dot_product_attention(is_causal=True)``: no score or
mask tensor is built here (packed examples, given by ``position_ids``: ``megallama.attention``). The attention input projection, the feed-forward block and the output
head with its loss have hand-written backwards (§2.4 of the paper): they save the inputs of their
matrix multiplies and recompute the cheap elementwise parts, so a layer keeps fewer activation
bytes than plain autograd would.

Fused weights: ``attention.wqkv`` holds the rows of Meta's ``wq``, ``wk``, ``wv`` one after the
other and ``feed_forward.w13`` those of ``w1`` then ``w3``, so each is one matrix multiply. Rotary
embeddings use the rotate-half layout (HF's), so HF weights load without a row permutation.

Activations are ``[batch, seq, hidden]``. A pipeline stage is a ``LlamaModel`` built with
``pre_process``/``post_process`` and the global ids of the layers it holds.

Tensor parallelism (Megatron's): built after ``megallama.parallel.initialize_model_parallel``,
each rank holds its heads of ``wqkv`` and its columns of ``w13`` (column-parallel), the matching
input columns of ``wo`` and ``w2`` (row-parallel), and its rows of the vocabulary in the embedding
and the head. With ``config.sequence_parallel`` the residual stream and the norms between blocks are
split along the sequence.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megallama import ops, parallel
from megallama.attention import DocumentLayout, causal_attention
from megallama.config import LlamaConfig

__all__ = ["LlamaConfig", "LlamaModel", "TransformerBlock", "get_param_groups",
           "linear_cross_entropy", "hf_to_megallama_state_dict", "megallama_to_hf_state_dict"]


class _QKVRotary(torch.autograd.Function):
    """``xn @ wqkv.T`` split into q, k, v ``[b, s, heads, head_dim]``, rotary applied to q and k.

    ``column`` is the ``wqkv`` layer: under sequence parallelism ``xn`` is this rank's sequence
    shard, gathered for the multiply. Saves only ``xn`` as received (the shard) and re-gathers it
    in backward; the backward writes the three gradients into one packed buffer, so the weight
    and input gradients are single matrix multiplies.
    """

    @staticmethod
    def forward(ctx, xn, wqkv, cos, sin, head_dim, column):
        full = column.gather_input(xn)
        b, s, _ = full.shape
        heads = wqkv.shape[0] // (3 * head_dim)
        qkv = F.linear(full, wqkv).view(b, s, 3, heads, head_dim)
        del full
        q = ops.rope_forward(qkv[:, :, 0], cos, sin, out=torch.empty_like(qkv[:, :, 0]))
        k = ops.rope_forward(qkv[:, :, 1], cos, sin, out=torch.empty_like(qkv[:, :, 1]))
        v = qkv[:, :, 2].contiguous()  # a copy, so the packed qkv buffer is freed now
        ctx.save_for_backward(xn, wqkv, cos, sin)
        ctx.column = column
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        xn, wqkv, cos, sin = ctx.saved_tensors
        gather = ctx.column.start_input_gather(xn) if ctx.needs_input_grad[1] else None
        b, s, heads, head_dim = grad_v.shape
        grad_qkv = torch.empty(b, s, 3, heads, head_dim, dtype=xn.dtype, device=xn.device)
        ops.rope_backward(grad_q, cos, sin, out=grad_qkv[:, :, 0])
        ops.rope_backward(grad_k, cos, sin, out=grad_qkv[:, :, 1])
        grad_qkv[:, :, 2].copy_(grad_v)
        grad_qkv = grad_qkv.view(b * s, -1)
        reduction = None
        if ctx.needs_input_grad[0]:
            reduction = ctx.column.start_input_grad_reduction((grad_qkv @ wqkv).view(b, s, -1))
        grad_w = grad_qkv.t() @ gather.wait().reshape(b * s, -1) if gather is not None else None
        grad_xn = reduction.wait() if reduction is not None else None
        return grad_xn, grad_w, None, None, None, None


class _SwiGLUFeedForward(torch.autograd.Function):
    """``w2(silu(w1 xn) * w3 xn)`` saving ``xn`` and the packed ``[w1 xn, w3 xn]`` only.

    Plain autograd would also keep ``silu(w1 xn)`` and the product; they are recomputed.
    ``column`` is the ``w13`` layer: as in ``_QKVRotary``, ``xn`` is kept as received (the
    sequence shard under sequence parallelism) and gathered again in backward. The output is
    this rank's partial sum, before ``w2``'s reduction.
    """

    @staticmethod
    def forward(ctx, xn, w13, w2, column):
        ab = F.linear(column.gather_input(xn), w13)
        out = F.linear(ops.swiglu_forward(ab), w2)
        ctx.save_for_backward(xn, ab, w13, w2)
        ctx.column = column
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xn, ab, w13, w2 = ctx.saved_tensors
        gather = ctx.column.start_input_gather(xn)
        lead_shape = grad_out.shape[:-1]  # [b, s] of the gathered input
        tokens = lead_shape.numel()
        grad_out = grad_out.reshape(tokens, -1)
        ab = ab.view(tokens, -1)
        act = ops.swiglu_forward(ab)
        grad_w2 = grad_out.t() @ act
        del act
        grad_ab = ops.swiglu_backward(grad_out @ w2, ab)
        reduction = ctx.column.start_input_grad_reduction((grad_ab @ w13).view(*lead_shape, -1))
        grad_w13 = grad_ab.t() @ gather.wait().reshape(tokens, -1)
        return reduction.wait(), grad_w13, grad_w2, None


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token ``cross_entropy(hn @ weight.T, target)`` that never keeps the logits.

    Logits are made a chunk of tokens at a time; the forward turns each chunk into the loss's
    gradient for a unit upstream gradient (softmax minus one-hot) and keeps only that, so the
    backward is a scale and two matrix multiplies: no logits, log-softmax or second softmax.
    """

    @staticmethod
    def forward(ctx, hn, weight, target, ignore_index, chunk_tokens):
        tokens = hn.shape[0]
        acc_dtype = torch.promote_types(hn.dtype, torch.float32)
        loss = torch.empty(tokens, dtype=acc_dtype, device=hn.device)
        single_chunk = tokens <= chunk_tokens  # then the chunk's buffer is kept as is, no copy
        unit_grad = None if single_chunk else torch.empty(tokens, weight.shape[0], dtype=hn.dtype, device=hn.device)
        valid = target != ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        for start in range(0, tokens, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, tokens))
            logits = (hn[rows] @ weight.t()).to(acc_dtype)
            tgt = safe_target[rows, None]
            keep = valid[rows, None].to(acc_dtype)
            target_logit = logits.gather(1, tgt)
            row_max = logits.amax(dim=-1, keepdim=True)
            # One exp pass serves both the log-sum-exp and the softmax (in place on the logits).
            probs = logits.sub_(row_max).exp_()
            sum_exp = probs.sum(dim=-1, keepdim=True)
            loss[rows] = ((row_max + sum_exp.log() - target_logit) * keep).squeeze(1)
            probs.mul_(keep / sum_exp).scatter_add_(1, tgt, -keep)
            if single_chunk:
                unit_grad = probs.to(hn.dtype)
            else:
                unit_grad[rows] = probs
        ctx.save_for_backward(hn, weight, unit_grad)
        ctx.chunk_tokens = chunk_tokens
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hn, weight, unit_grad = ctx.saved_tensors
        grad_hn = torch.empty_like(hn) if ctx.needs_input_grad[0] else None
        grad_w = None
        for start in range(0, hn.shape[0], ctx.chunk_tokens):
            rows = slice(start, min(start + ctx.chunk_tokens, hn.shape[0]))
            grad_logits = unit_grad[rows] * grad_loss[rows, None].to(unit_grad.dtype)
            if grad_hn is not None:
                torch.mm(grad_logits, weight, out=grad_hn[rows])
            if ctx.needs_input_grad[1]:
                chunk_grad_w = grad_logits.t() @ hn[rows]
                grad_w = chunk_grad_w if grad_w is None else grad_w.add_(chunk_grad_w)
        return grad_hn, grad_w, None, None, None


def linear_cross_entropy(hn: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100, chunk_tokens: int = 4096) -> torch.Tensor:
    """Per-token cross-entropy of the logits ``hn @ weight.T`` (``[tokens]``, float32 or wider).

    ``target == ignore_index`` gives loss 0 and no gradient; other targets must be in range.
    """
    if hn.dim() != 2 or target.shape != hn.shape[:1]:
        raise ValueError(f"linear_cross_entropy wants hn [tokens, hidden] and target [tokens], "
                         f"got {tuple(hn.shape)} and {tuple(target.shape)}")
    valid = target[target != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= weight.shape[0]):
        raise ValueError(f"target ids must lie in [0, {weight.shape[0]}) (or be {ignore_index}); "
                         f"got range [{int(valid.min())}, {int(valid.max())}]")
    return _LinearCrossEntropy.apply(hn, weight, target, ignore_index, chunk_tokens)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.sequence_parallel:  # each rank sees part of the sequence: sum the weight's gradient
            weight = parallel.copy_to_tensor_model_parallel_region(weight)
        return ops.rms_norm(x, weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.head_dim = config.head_dim
        h, sp, dtype = config.hidden_size, config.sequence_parallel, config.params_dtype
        self.wqkv = parallel.ColumnParallelLinear(h, 3 * h, stacked=3, sequence_parallel=sp, dtype=dtype)
        self.wo = parallel.RowParallelLinear(h, h, sequence_parallel=sp, dtype=dtype)

    def forward(self, xn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: DocumentLayout | None = None) -> torch.Tensor:
        q, k, v = _QKVRotary.apply(xn, self.wqkv.weight, cos, sin, self.head_dim, self.wqkv)
        # q, k, v are [b, s, heads, d] in memory: SDPA takes the transposed views and returns
        # its output in the same layout, so the reshape for wo is free.
        out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), documents)
        out = out.transpose(1, 2).reshape(*q.shape[:2], -1)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, f, sp, dtype = config.hidden_size, config.ffn_hidden_size, config.sequence_parallel, config.params_dtype
        self.w13 = parallel.ColumnParallelLinear(h, 2 * f, stacked=2, sequence_parallel=sp, dtype=dtype)
        self.w2 = parallel.RowParallelLinear(f, h, sequence_parallel=sp, dtype=dtype)

    def forward(self, xn: torch.Tensor) -> torch.Tensor:
        out = _SwiGLUFeedForward.apply(xn, self.w13.weight, self.w2.weight, self.w13)
        return self.w2.parallel_output(out)


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        norm_args = (config.hidden_size, config.norm_epsilon, config.params_dtype, config.sequence_parallel)
        self.attention_norm = RMSNorm(*norm_args)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(*norm_args)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: DocumentLayout | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, documents)
        return h + self.feed_forward(self.ffn_norm(h))


class LlamaModel(nn.Module):
    """LLaMA, or one pipeline stage of it.

    ``model(input_ids)`` → logits ``[batch, seq, vocab]``; ``model(input_ids, labels=targets)`` →
    per-token cross-entropy ``[batch, seq]`` (float32), targets already aligned with positions.
    A stage without ``pre_process`` takes ``hidden_states``; one without ``post_process`` returns
    hidden states. ``layer_ids`` are the global ids of the layers held (default: all).
    Under tensor parallelism every rank returns the full logits or loss; with sequence parallelism
    the hidden states a stage takes or returns are this rank's part of the sequence.
    ``position_ids`` ``[batch, seq]`` (full sequence, every stage) pack several examples in a row:
    a 0 starts an example, rotary positions restart there and attention never crosses it.
    """

    def __init__(self, config: LlamaConfig, *, pre_process: bool = True, post_process: bool = True,
                 layer_ids: list[int] | None = None):
        super().__init__()
        self.config = config
        self.pre_process, self.post_process = pre_process, post_process
        layer_ids = list(range(config.num_layers)) if layer_ids is None else list(layer_ids)
        bad = [i for i in layer_ids if not 0 <= i < config.num_layers]
        if bad:
            raise ValueError(f"layer ids {bad} outside [0, {config.num_layers})")
        tp = parallel.get_tensor_model_parallel_world_size()
        for name in ("num_attention_heads", "ffn_hidden_size"):
            if getattr(config, name) % tp:
                raise ValueError(f"LlamaConfig.{name} ({getattr(config, name)}) must be divisible by the "
                                 f"tensor-parallel size ({tp})")
        dtype, sp = config.params_dtype, config.sequence_parallel
        if pre_process:
            self.tok_embeddings = parallel.VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, sequence_parallel=sp, dtype=dtype)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(config, i) for i in layer_ids})
        if post_process:
            self.norm = RMSNorm(config.hidden_size, config.norm_epsilon, dtype, sp)
            # A vocabulary not divisible by TP is padded; the padding rows never reach the logits.
            self.output = parallel.ColumnParallelLinear(
                config.hidden_size, config.vocab_size, gather_output=True, pad_output=True,
                sequence_parallel=sp, dtype=dtype)
        self._rope_cache: dict = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, std) weights; the projections into the residual stream (``wo``, ``w2``) use
        std / sqrt(2·layers) as in Megatron; norms start at one. Split weights get their shard of
        the full tensor drawn as the serial model would."""
        std = self.config.init_method_std
        out_std = std / math.sqrt(2.0 * self.config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                parallel.init_parameter_(p, lambda t: nn.init.normal_(t, 0.0, out_std))
            else:
                parallel.init_parameter_(p, lambda t: nn.init.normal_(t, 0.0, std))

    def rotary(self, seq_len: int, device: torch.device, offset: int = 0):
        """(cos, sin) float32 ``[seq_len, head_dim/2]`` for positions offset … offset+seq_len-1."""
        end = offset + seq_len
        if end > self.config.max_position_embeddings:
            raise ValueError(f"positions up to {end} exceed max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        key = str(device)
        if key not in self._rope_cache:
            cos, sin = ops.rope_cos_sin(self.config.max_position_embeddings, self.config.head_dim,
                                        self.config.rope_theta)
            self._rope_cache[key] = (cos.to(device), sin.to(device))
        cos, sin = self._rope_cache[key]
        return cos[offset:end], sin[offset:end]

    def forward(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first stage needs input_ids")
            h = self.tok_embeddings(input_ids)
        else:
            if hidden_states is None:
                raise ValueError("a stage without pre_process needs hidden_states")
            h = hidden_states
        seq_len = h.shape[1]
        if self.config.sequence_parallel:  # h holds this rank's part of the sequence
            seq_len *= parallel.get_tensor_model_parallel_world_size()
        cos, sin = self.rotary(seq_len, h.device)
        documents = None
        if position_ids is not None:  # packed examples: positions restart, attention stays inside each
            if position_ids.shape != (h.shape[0], seq_len):
                raise ValueError(f"position_ids {tuple(position_ids.shape)} must be {(h.shape[0], seq_len)}")
            documents = DocumentLayout(position_ids)
            cos, sin = cos[position_ids], sin[position_ids]
        for layer in self.layers.values():
            if self.config.recompute_granularity == "full" and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, documents, use_reentrant=False)
            else:
                h = layer(h, cos, sin, documents)
        if not self.post_process:
            return h
        h = self.norm(h)
        if labels is None:
            return self.output(h)
        if labels.shape != (h.shape[0], seq_len):
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {(h.shape[0], seq_len)}")
        if parallel.get_tensor_model_parallel_world_size() > 1:
            logits = self.output.local_output(h)  # this rank's vocabulary
            return parallel.vocab_parallel_cross_entropy(logits, labels, self.config.vocab_size)
        loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.output.weight, labels.reshape(-1))
        return loss.view(labels.shape)

    def load_hf_state_dict(self, hf_state_dict: dict, strict: bool = True) -> None:
        """Load a ``transformers`` ``LlamaForCausalLM`` state dict (the parts this stage holds;
        under tensor parallelism, this rank's shard of each full tensor)."""
        ours = hf_to_megallama_state_dict(hf_state_dict, self.config)
        own = dict(self.named_parameters())
        if strict:
            missing = sorted(set(own) - set(ours))
            if missing:
                raise KeyError(f"HF state dict lacks tensors for: {missing[:5]}{' …' if len(missing) > 5 else ''}")
        self.load_state_dict({k: parallel.shard_like(own[k], v) for k, v in ours.items() if k in own}, strict=strict)

    def hf_state_dict(self) -> dict:
        """This stage's full weights under ``LlamaForCausalLM``'s names (gathered over the
        tensor-parallel ranks: a collective call under TP)."""
        full = {k: parallel.gather_like(p, p.detach()) for k, p in self.named_parameters()}
        return megallama_to_hf_state_dict(full, self.config)


def hf_to_megallama_state_dict(hf: dict, config: LlamaConfig) -> dict:
    """HF ``LlamaForCausalLM`` names → ours (fusing q/k/v and gate/up); same rotate-half rows."""
    out = {}
    for name, t in hf.items():
        if name == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = t
        elif name == "model.norm.weight":
            out["norm.weight"] = t
        elif name == "lm_head.weight":
            out["output.weight"] = t
        elif name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            p = f"layers.{i}."
            if rest == "self_attn.q_proj.weight":
                out[p + "attention.wqkv.weight"] = torch.cat([t, hf[f"model.layers.{i}.self_attn.k_proj.weight"],
                                                       hf[f"model.layers.{i}.self_attn.v_proj.weight"]])
            elif rest == "self_attn.o_proj.weight":
                out[p + "attention.wo.weight"] = t
            elif rest == "mlp.gate_proj.weight":
                out[p + "feed_forward.w13.weight"] = torch.cat([t, hf[f"model.layers.{i}.mlp.up_proj.weight"]])
            elif rest == "mlp.down_proj.weight":
                out[p + "feed_forward.w2.weight"] = t
            elif rest == "input_layernorm.weight":
                out[p + "attention_norm.weight"] = t
            elif rest == "post_attention_layernorm.weight":
                out[p + "ffn_norm.weight"] = t
            elif rest not in ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.up_proj.weight",
                              "self_attn.rotary_emb.inv_freq"):
                raise KeyError(f"unexpected HF tensor {name!r}")
        elif not name.endswith("rotary_emb.inv_freq"):
            raise KeyError(f"unexpected HF tensor {name!r}")
    return out


def megallama_to_hf_state_dict(sd: dict, config: LlamaConfig) -> dict:
    """Our names → HF ``LlamaForCausalLM``'s (splitting the fused projections)."""
    h, f = config.hidden_size, config.ffn_hidden_size
    out = {}
    for name, t in sd.items():
        if name == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "norm.weight":
            out["model.norm.weight"] = t
        elif name == "output.weight":
            out["lm_head.weight"] = t
        else:
            _, i, rest = name.split(".", 2)
            p = f"model.layers.{i}."
            if rest == "attention.wqkv.weight":
                q, k, v = t.split(h)
                out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                            p + "self_attn.v_proj.weight": v})
            elif rest == "attention.wo.weight":
                out[p + "self_attn.o_proj.weight"] = t
            elif rest == "feed_forward.w13.weight":
                gate, up = t.split(f)
                out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up})
            elif rest == "feed_forward.w2.weight":
                out[p + "mlp.down_proj.weight"] = t
            elif rest == "attention_norm.weight":
                out[p + "input_layernorm.weight"] = t
            elif rest == "ffn_norm.weight":
                out[p + "post_attention_layernorm.weight"] = t
            else:
                raise KeyError(f"unexpected megallama tensor {name!r}")
    return out


def get_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (≥2-D: projections, embedding, head) decay; norms don't."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
