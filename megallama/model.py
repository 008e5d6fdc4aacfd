"""The LLaMA network (Touvron et al. 2023), readable top to bottom, in the paper's names.

Pre-norm RMSNorm, SwiGLU feed-forward, rotary embeddings on q and k, no biases, untied output
head. Causal attention goes through ``scaled_dot_product_attention(is_causal=True)``: no score or
mask tensor is built here (packed examples, given by ``position_ids``: ``megallama.attention``). The attention input projection, the feed-forward block and the output
head with its loss have hand-written backwards (§2.4 of the paper): they save the inputs of their
matrix multiplies and recompute the cheap elementwise parts, so a layer keeps fewer activation
bytes than plain autograd would.

Every parameter (name, full shape, tensor-parallel split, initialisation, HF and Meta names) is
declared once in ``megallama.parameter_table``; the modules here are built from that table. Fused
weights: ``attention.wqkv`` stacks q, k, v and ``feed_forward.w13`` gate and up, so each is one
matrix multiply. Rotary embeddings use the rotate-half layout (HF's), so HF weights load without
a row permutation.

Activations are ``[batch, seq, hidden]``. A pipeline stage is a ``LlamaModel`` built with
``pre_process``/``post_process`` and the global ids of the layers it holds.

Tensor parallelism (Megatron's): built after ``megallama.parallel.initialize_model_parallel``,
each rank holds its heads of ``wqkv`` and its columns of ``w13`` (column-parallel), the matching
input columns of ``wo`` and ``w2`` (row-parallel), and its rows of the vocabulary in the embedding
and the head. With ``config.sequence_parallel`` the residual stream and the norms between blocks are
split along the sequence.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megallama import host_checks, ops, parallel
from megallama.attention import DocumentLayout, causal_attention
from megallama.config import LlamaConfig
from megallama.kv_cache import KVCache, LayerKVCache
from megallama.parameter_table import (INIT_NORMAL, INIT_ONES, INIT_SCALED_NORMAL, ParameterSpec, hf_to_ours,
                                       ours_to_hf, parameter_table)

__all__ = ["LlamaConfig", "LlamaModel", "TransformerBlock", "get_param_groups", "linear_cross_entropy"]


class _QKVRotary(torch.autograd.Function):
    """``xn @ wqkv.T`` split into q ``[b, s, heads, head_dim]`` and k, v ``[b, s, kv_heads,
    head_dim]`` (this rank's heads; fewer key/value heads under grouped-query attention), rotary
    applied to q and k.

    ``column`` is the ``wqkv`` layer: under sequence parallelism ``xn`` is this rank's sequence
    shard, gathered for the multiply. Saves only ``xn`` as received (the shard) and re-gathers it
    in backward; the backward writes the three gradients into one packed buffer, so the weight
    and input gradients are single matrix multiplies. Key/value heads replicated over several
    ranks (TP above their number) get the sum of the replicas' weight gradients.
    """

    @staticmethod
    def forward(ctx, xn, wqkv, cos, sin, head_dim, column):
        full = column.gather_input(xn)
        b, s, _ = full.shape
        rows = column.local_parts
        q, k, v = (part.view(b, s, -1, head_dim) for part in F.linear(full, wqkv).split(rows, dim=-1))
        del full
        q = ops.rope_forward(q, cos, sin, out=torch.empty(q.shape, dtype=q.dtype, device=q.device))
        k = ops.rope_forward(k, cos, sin, out=torch.empty(k.shape, dtype=k.dtype, device=k.device))
        v = v.contiguous()  # a copy, so the packed qkv buffer is freed now
        ctx.save_for_backward(xn, wqkv, cos, sin)
        ctx.column, ctx.rows = column, rows
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        xn, wqkv, cos, sin = ctx.saved_tensors
        gather = ctx.column.start_input_gather(xn) if ctx.needs_input_grad[1] else None
        b, s = grad_v.shape[:2]
        grad_qkv = torch.empty(b, s, sum(ctx.rows), dtype=xn.dtype, device=xn.device)
        out_q, out_k, out_v = grad_qkv.split(ctx.rows, dim=-1)
        # the rope kernels read contiguous gradients (some attention kernels return strided ones)
        ops.rope_backward(grad_q.contiguous(), cos, sin, out=out_q.view(grad_q.shape))
        ops.rope_backward(grad_k.contiguous(), cos, sin, out=out_k.view(grad_k.shape))
        out_v.view(grad_v.shape).copy_(grad_v)
        grad_qkv = grad_qkv.view(b * s, -1)
        reduction = None
        if ctx.needs_input_grad[0]:
            reduction = ctx.column.start_input_grad_reduction((grad_qkv @ wqkv).view(b, s, -1))
        grad_w = None
        if gather is not None:
            grad_w = parallel.weight_grad(wqkv, grad_qkv, gather.wait().reshape(b * s, -1), ctx.column.fusable_wgrad)
            if ctx.column.has_replicas:
                grad_w = ctx.column.split.sum_over_replicas(
                    grad_w, parallel.get_tensor_model_parallel_rank(), parallel.get_tensor_model_parallel_world_size(),
                    parallel.get_tensor_model_parallel_group())
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
        grad_w2 = parallel.weight_grad(w2, grad_out, act)
        del act
        grad_ab = ops.swiglu_backward(grad_out @ w2, ab)
        reduction = ctx.column.start_input_grad_reduction((grad_ab @ w13).view(*lead_shape, -1))
        grad_w13 = parallel.weight_grad(w13, grad_ab, gather.wait().reshape(tokens, -1), ctx.column.fusable_wgrad)
        return reduction.wait(), grad_w13, grad_w2, None


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token ``cross_entropy(hn @ weight.T, target)`` that never keeps the logits.

    Logits are made a chunk of tokens at a time; the forward turns each chunk into the loss's
    gradient for a unit upstream gradient (softmax minus one-hot) and keeps only that, so the
    backward is two matrix multiplies: no logits, log-softmax or second softmax.
    """

    @staticmethod
    def forward(ctx, hn, weight, target, ignore_index, chunk_tokens, fusable_wgrad):
        tokens = hn.shape[0]
        loss = torch.empty(tokens, dtype=torch.promote_types(hn.dtype, torch.float32), device=hn.device)
        unit_grad = torch.empty(tokens, weight.shape[0], dtype=hn.dtype, device=hn.device)
        for start in range(0, tokens, chunk_tokens):
            rows = slice(start, min(start + chunk_tokens, tokens))
            # The chunk's logits are made in the buffer kept for backward and turned into the unit
            # gradient there by one fused kernel (max and sum of exp in fp32, then the gradient):
            # no fp32 copy of the logits, no pass per elementwise op.
            logits = torch.mm(hn[rows], weight.t(), out=unit_grad[rows])
            loss[rows] = ops.cross_entropy_unit_grad_(logits, target[rows], ignore_index)
        ctx.save_for_backward(hn, weight, unit_grad)
        ctx.chunk_tokens, ctx.fusable_wgrad = chunk_tokens, fusable_wgrad
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hn, weight, unit_grad = ctx.saved_tensors
        grad_hn = torch.empty_like(hn) if ctx.needs_input_grad[0] else None
        grad_w = None
        # With gradient-accumulation fusion every chunk's product goes into main_grad directly.
        signal = parallel.main_grad_signal(weight, ctx.fusable_wgrad) if ctx.needs_input_grad[1] else None
        # The upstream gradient scales each token's row of the unit gradient: applied to the
        # hidden-wide operands instead (diag(g)·U·W = diag(g)·(U·W), (diag(g)·U)ᵀ·hn = Uᵀ·(diag(g)·hn)),
        # so no vocabulary-wide scaled copy is made.
        scale = grad_loss.to(hn.dtype)[:, None]
        for start in range(0, hn.shape[0], ctx.chunk_tokens):
            rows = slice(start, min(start + ctx.chunk_tokens, hn.shape[0]))
            if grad_hn is not None:
                torch.mm(unit_grad[rows], weight, out=grad_hn[rows]).mul_(scale[rows])
            if not ctx.needs_input_grad[1]:
                continue
            scaled_hn = hn[rows] * scale[rows]
            if signal is not None:
                ops.wgrad_accumulate_(weight.main_grad, unit_grad[rows], scaled_hn)
            else:
                chunk_grad_w = unit_grad[rows].t() @ scaled_hn
                grad_w = chunk_grad_w if grad_w is None else grad_w.add_(chunk_grad_w)
        if signal is not None:
            signal()
        return grad_hn, grad_w, None, None, None, None


def linear_cross_entropy(hn: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100, chunk_tokens: int = 4096,
                         fusable_wgrad: bool = False) -> torch.Tensor:
    """Per-token cross-entropy of the logits ``hn @ weight.T`` (``[tokens]``, float32 or wider).

    ``target == ignore_index`` gives loss 0 and no gradient; other targets must be in range.
    ``fusable_wgrad``: ``weight`` is used nowhere else, so its gradient may go straight into its
    ``main_grad`` (:func:`megallama.parallel.weight_grad`).
    """
    if hn.dim() != 2 or target.shape != hn.shape[:1]:
        raise ValueError(f"linear_cross_entropy wants hn [tokens, hidden] and target [tokens], "
                         f"got {tuple(hn.shape)} and {tuple(target.shape)}")
    if host_checks.readable_without_sync(target):  # on a device: the trainer checked the host copy
        valid = target[target != ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= weight.shape[0]):
            raise ValueError(f"target ids must lie in [0, {weight.shape[0]}) (or be {ignore_index}); "
                             f"got range [{int(valid.min())}, {int(valid.max())}]")
    return _LinearCrossEntropy.apply(hn, weight, target, ignore_index, chunk_tokens, fusable_wgrad)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32, sequence_parallel: bool = False):
        super().__init__()
        self.eps = eps
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # raw kernel: a Function's overhead exceeds a decoding step's norm
            return ops.rms_norm_forward(x, self.weight, self.eps)[0]
        weight = self.weight
        if self.sequence_parallel:  # each rank sees part of the sequence: sum the weight's gradient
            weight = parallel.copy_to_tensor_model_parallel_region(weight)
        return ops.rms_norm(x, weight, self.eps)


def _linear(layer_class, spec: ParameterSpec, config: LlamaConfig, **kwargs):
    """A parallel linear layer of the table's shape and split (weights are ``[out, in]``)."""
    out_features, in_features = spec.shape
    return layer_class(in_features, out_features, split=spec.split, sequence_parallel=config.sequence_parallel,
                       dtype=config.params_dtype, **kwargs)


def _row_parallel_sum(layer: parallel.RowParallelLinear, partial: torch.Tensor) -> torch.Tensor:
    """``layer.parallel_output(partial)``: the sum over the TP ranks of their partial products.
    Skipped on one rank without autograd, where it sums nothing and its autograd Function costs
    as much as a decoding step's small matrix multiply."""
    if torch.is_grad_enabled() or parallel.get_tensor_model_parallel_world_size() > 1:
        return layer.parallel_output(partial)
    return partial


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, table: dict[str, ParameterSpec], prefix: str):
        super().__init__()
        self.head_dim = config.head_dim
        self.wqkv = _linear(parallel.ColumnParallelLinear, table[prefix + "wqkv.weight"], config)
        self.wo = _linear(parallel.RowParallelLinear, table[prefix + "wo.weight"], config)
        self.kv_heads = self.wqkv.local_parts[1] // self.head_dim  # this rank's (a replica where TP exceeds them)

    def forward(self, xn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: DocumentLayout | None = None, cache: LayerKVCache | None = None) -> torch.Tensor:
        """Causal self-attention over the normed ``xn`` [b, s, hidden] at the positions whose rotary
        ``cos``/``sin`` are given. With ``cache`` (this layer's part of a ``KVCache``; no autograd)
        the positions follow the cached ones: their keys and values are written into the cache and
        the queries attend over everything cached."""
        if cache is not None:
            out = self._attend_with_cache(xn, cos, sin, cache)
        else:
            q, k, v = _QKVRotary.apply(xn, self.wqkv.weight, cos, sin, self.head_dim, self.wqkv)
            # q, k, v are [b, s, heads, d] in memory: SDPA takes the transposed views and returns
            # its output in the same layout, so the reshape for wo is free.
            out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), documents)
            out = out.transpose(1, 2).reshape(*q.shape[:2], -1)
        return _row_parallel_sum(self.wo, parallel.linear(out, self.wo.weight))

    def _attend_with_cache(self, xn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           cache: LayerKVCache) -> torch.Tensor:
        b, s, _ = xn.shape
        kv_heads = self.kv_heads  # each serves q_heads / kv_heads query heads
        qkv = F.linear(xn, self.wqkv.weight).view(b, s, -1, self.head_dim)  # q heads, k heads, v heads
        q_heads = qkv.shape[2] - 2 * kv_heads
        q, k, v = qkv.split([q_heads, kv_heads, kv_heads], dim=2)
        new_keys, new_values = cache.new_slots(s)
        ops.rope_forward(k, cos, sin, out=new_keys)  # rotated keys straight into the cache
        new_values.copy_(v)
        q = ops.rope_forward(q, cos, sin).transpose(1, 2)  # [b, q_heads, s, d]
        keys, values = cache.filled(s)
        mask = cache.attention_mask
        if s == 1:
            # One query per row: two small matrix products (CPU SDPA kernels are tuned for long
            # query blocks and cost many times more here). The query heads sharing a key/value head
            # are the rows of one product.
            grouped = q.view(b, kv_heads, -1, self.head_dim)
            scores = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(self.head_dim ** -0.5)
            if mask is not None:
                scores.masked_fill_(~mask, float("-inf"))
            out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), values)
            out = out.view(b, q_heads, s, self.head_dim)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                                 enable_gqa=q_heads != kv_heads)
        return out.transpose(1, 2).reshape(b, s, -1)


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig, table: dict[str, ParameterSpec], prefix: str):
        super().__init__()
        self.w13 = _linear(parallel.ColumnParallelLinear, table[prefix + "w13.weight"], config)
        self.w2 = _linear(parallel.RowParallelLinear, table[prefix + "w2.weight"], config)

    def forward(self, xn: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            out = _SwiGLUFeedForward.apply(xn, self.w13.weight, self.w2.weight, self.w13)
        else:  # the same products without the Function's bookkeeping (decoding steps are tiny)
            out = F.linear(ops.swiglu_forward(F.linear(self.w13.gather_input(xn), self.w13.weight)), self.w2.weight)
        return _row_parallel_sum(self.w2, out)


def _norm(spec: ParameterSpec, config: LlamaConfig) -> RMSNorm:
    return RMSNorm(spec.shape[0], config.norm_epsilon, config.params_dtype, config.sequence_parallel)


class TransformerBlock(nn.Module):
    def __init__(self, config: LlamaConfig, layer_id: int, table: dict[str, ParameterSpec]):
        super().__init__()
        self.layer_id = layer_id
        prefix = f"layers.{layer_id}."
        self.attention_norm = _norm(table[prefix + "attention_norm.weight"], config)
        self.attention = Attention(config, table, prefix + "attention.")
        self.ffn_norm = _norm(table[prefix + "ffn_norm.weight"], config)
        self.feed_forward = FeedForward(config, table, prefix + "feed_forward.")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                documents: DocumentLayout | None = None, cache: KVCache | None = None) -> torch.Tensor:
        layer_cache = cache.layers[self.layer_id] if cache is not None else None
        h = x + self.attention(self.attention_norm(x), cos, sin, documents, layer_cache)
        return h + self.feed_forward(self.ffn_norm(h))


class _PackedWeight(NamedTuple):
    packed: torch.Tensor
    weight: torch.Tensor  # the parameter packed, with its storage and version counter then
    data_ptr: int
    version: int

    def is_current(self, weight: torch.Tensor) -> bool:
        """Whether ``weight`` is the parameter packed, unchanged since: an in-place write bumps its
        version, ``.to()`` or ``.data =`` swaps its storage."""
        return weight is self.weight and weight.data_ptr() == self.data_ptr and weight._version == self.version


def _pack_for_onednn(weight: torch.Tensor) -> _PackedWeight | None:
    """``weight`` reordered for oneDNN's matrix multiply (a copy), or None where torch has no
    oneDNN. With several rows (batched decoding) MKL's sgemm runs the output head's wide, flat
    product at a fraction of oneDNN's speed on some CPUs (3× slower on an AMD EPYC)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except (AttributeError, RuntimeError):  # an op of torch's own, absent from some builds
        return None
    return _PackedWeight(packed, weight, weight.data_ptr(), weight._version)


class LlamaModel(nn.Module):
    """LLaMA, or one pipeline stage of it.

    ``model(input_ids)`` → logits ``[batch, seq, vocab]``; ``model(input_ids, labels=targets)`` →
    per-token cross-entropy ``[batch, seq]`` (float32), targets already aligned with positions.
    A stage without ``pre_process`` takes ``hidden_states``; one without ``post_process`` returns
    hidden states. ``layer_ids`` are the global ids of the layers held (default: all). With
    ``tie_word_embeddings`` a last stage without the embedding holds a copy of it as
    ``output.weight`` (Megatron's): the two stages sum their gradients, so the copies stay equal.
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
        config.check_parallel_layout(tensor_model_parallel_size=parallel.get_tensor_model_parallel_world_size())
        self.parameter_table = parameter_table(config, layer_ids, pre_process, post_process)
        table = self.parameter_table
        if pre_process:
            spec = table["tok_embeddings.weight"]
            self.tok_embeddings = parallel.VocabParallelEmbedding(
                *spec.shape, split=spec.split, sequence_parallel=config.sequence_parallel, dtype=config.params_dtype)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(config, i, table) for i in layer_ids})
        if post_process:
            self.norm = _norm(table["norm.weight"], config)
            # A vocabulary not divisible by TP is padded; the padding rows never reach the logits.
            if config.tie_word_embeddings and pre_process:
                # The head multiplies by the embedding: one parameter (made on the meta device here, then
                # replaced, so no second vocabulary-sized matrix is ever drawn).
                self.output = _linear(parallel.ColumnParallelLinear, table["tok_embeddings.weight"], config,
                                      gather_output=True, device="meta")
                self.output.weight = self.tok_embeddings.weight
                self.output.fusable_wgrad = False  # the embedding's gradient is the sum of two uses
            else:  # untied, or the tied head's copy on a last pipeline stage
                self.output = _linear(parallel.ColumnParallelLinear, table["output.weight"], config, gather_output=True)
        if config.tie_word_embeddings and pre_process != post_process:
            self._mark_shared_embedding()
        self._rope_cache: dict = {}
        self.reset_parameters()

    def _mark_shared_embedding(self) -> None:
        """The embedding on a first stage, or its copy as the head on a last one: the two stages sum
        their gradients (``DistributedDataParallel``), the gradient norm counts the first stage's."""
        param = self.tok_embeddings.weight if self.pre_process else self.output.weight
        param.shared = True
        if not self.pre_process:  # checkpoints read and write it as the embedding
            param.stored_as = self.parameter_table["output.weight"].stored_as

    def reset_parameters(self) -> None:
        """Normal(0, std) weights; the projections into the residual stream (``wo``, ``w2``) use
        std / sqrt(2·layers) as in Megatron; norms start at one. Split weights get their shard of
        the full tensor drawn as the serial model would."""
        std = self.config.init_method_std
        stds = {INIT_NORMAL: std, INIT_SCALED_NORMAL: std / math.sqrt(2.0 * self.config.num_layers)}
        for name, p in self.named_parameters():
            init = self.parameter_table[name].init
            if init == INIT_ONES:
                nn.init.ones_(p)
            else:
                parallel.init_parameter_(p, lambda t, std=stds[init]: nn.init.normal_(t, 0.0, std))

    @torch.no_grad()
    def initialize_layout_free(self, seed: int) -> None:
        """Re-draw this chunk's weights so they do not depend on the parallel layout: the embedding
        (with a tied head), each layer ``i`` and the head each come from a one-part model built on
        the CPU under a seed of their own, as ``reset_parameters`` draws them (so a GPU run starts
        from the same weights as a CPU run, and any pipeline split from the serial model's). A tied
        head's copy on a last stage is drawn as the embedding it copies."""
        fp32 = dataclasses.replace(self.config, params_dtype=torch.float32)
        tied, num_layers = self.config.tie_word_embeddings, self.config.num_layers
        parts = [(dict(layer_ids=[i], pre_process=False, post_process=False), i + 1) for i in map(int, self.layers)]
        if self.pre_process or (self.post_process and tied):
            parts.append((dict(layer_ids=[], pre_process=True, post_process=tied), 0))
        if self.post_process and not tied:
            parts.append((dict(layer_ids=[], pre_process=False, post_process=True), num_layers + 1))
        params = dict(self.named_parameters())
        for kwargs, offset in parts:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + offset)
                values = dict(LlamaModel(fp32, **kwargs).named_parameters())
            for name, param in params.items():
                source = self.parameter_table[name].stored_as or name
                if source in values:
                    param.copy_(values[source])

    def rotary(self, seq_len: int, device: torch.device, offset: int = 0):
        """(cos, sin) float32 ``[seq_len, head_dim/2]`` for positions offset … offset+seq_len-1."""
        end = offset + seq_len
        if end > self.config.max_position_embeddings:
            raise ValueError(f"positions up to {end} exceed max_position_embeddings "
                             f"({self.config.max_position_embeddings})")
        key = str(device)
        if key not in self._rope_cache:
            cos, sin = ops.rope_cos_sin(self.config.max_position_embeddings, self.config.head_dim,
                                        self.config.rope_theta, scaling=self.config.rope_scaling)
            if device.type == "cuda":  # from pinned memory: the first forward does not wait for the copy
                cos, sin = cos.pin_memory(), sin.pin_memory()
            self._rope_cache[key] = (cos.to(device, non_blocking=True), sin.to(device, non_blocking=True))
        cos, sin = self._rope_cache[key]
        return cos[offset:end], sin[offset:end]

    def forward(self, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int | None = None) -> torch.Tensor:
        """The class docstring tells inputs and outputs. For decoding (under ``torch.no_grad()``):

        ``cache``: a ``KVCache``; the positions run follow its ``cache.length`` cached ones, their
        keys and values are added to it and ``cache.length`` advances.
        ``logits_to_keep``: logits of the last that many positions only, ``[batch, logits_to_keep,
        vocab]`` (a prompt's prefill needs the last one; the head over every position is wasted).
        """
        if cache is not None and (torch.is_grad_enabled() or position_ids is not None
                                  or self.config.sequence_parallel):
            raise ValueError("a forward with a KV cache runs under torch.no_grad(), without position_ids "
                             "or sequence parallelism")
        if logits_to_keep is not None and (logits_to_keep < 1 or labels is not None or self.config.sequence_parallel):
            raise ValueError(f"logits_to_keep must be >= 1, without labels or sequence parallelism; "
                             f"got {logits_to_keep}")
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first stage needs input_ids")
            h = self._embed(input_ids)
        else:
            if hidden_states is None:
                raise ValueError("a stage without pre_process needs hidden_states")
            h = hidden_states
        seq_len = h.shape[1]
        if self.config.sequence_parallel:  # h holds this rank's part of the sequence
            seq_len *= parallel.get_tensor_model_parallel_world_size()
        start = 0
        if cache is not None:
            start = cache.length
            cache.begin(seq_len, h.device)
        cos, sin = self.rotary(seq_len, h.device, offset=start)
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
                h = layer(h, cos, sin, documents, cache)
        if cache is not None:
            cache.advance(seq_len)
        if not self.post_process:
            return h
        if logits_to_keep is not None and logits_to_keep < h.shape[1]:
            h = h[:, -logits_to_keep:]
        h = self.norm(h)
        if labels is None:
            return self._logits(h)
        if labels.shape != (h.shape[0], seq_len):
            raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {(h.shape[0], seq_len)}")
        if parallel.get_tensor_model_parallel_world_size() > 1:
            # over this rank's vocabulary, the logits never kept beside their gradient
            return parallel.vocab_parallel_linear_cross_entropy(h, self.output, labels, self.config.vocab_size)
        loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.output.weight, labels.reshape(-1),
                                    fusable_wgrad=self.output.fusable_wgrad)
        return loss.view(labels.shape)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings. On one CPU rank without autograd a plain lookup, which checks the
        ids' range itself: in a decoding step the layer's own check and sum cost four lookups."""
        if (torch.is_grad_enabled() or input_ids.device.type != "cpu"
                or parallel.get_tensor_model_parallel_world_size() > 1):
            return self.tok_embeddings(input_ids)
        return F.embedding(input_ids, self.tok_embeddings.weight)

    def _logits(self, hn: torch.Tensor) -> torch.Tensor:
        """The output head over final normed states, whole vocabulary on every rank. Without
        autograd on one rank it multiplies by the oneDNN-packed copy ``prepare_for_inference``
        made, while the weight is unchanged since."""
        if torch.is_grad_enabled() or parallel.get_tensor_model_parallel_world_size() > 1:
            return self.output(hn)
        packed = self._packed_output
        if packed is not None and packed.is_current(self.output.weight):
            return torch.ops.mkldnn._linear_pointwise(hn, packed.packed, None, "none", [], "")
        return F.linear(hn, self.output.weight)

    _packed_output: _PackedWeight | None = None  # set by prepare_for_inference

    @torch.no_grad()
    def prepare_for_inference(self) -> LlamaModel:
        """Store the matrix-multiply weights column-major (same shape and values, transposed
        memory), in place, and switch to eval mode; returns the model.

        ``F.linear`` then runs ``x @ W.T`` as a plain product of row-major matrices, which MKL does
        several times faster for the one-row products of decoding on CPU (the output head most of
        all) and as fast for prefill. On CPU it also keeps a oneDNN-packed copy of the output head
        (vocabulary × hidden floats more memory). Only for a model that no longer trains: its
        optimizer would see the parameters' storage change.
        """
        for name, param in self.named_parameters():
            # the embedding table is gathered from, not multiplied
            if param.dim() == 2 and param.device.type == "cpu" and name != "tok_embeddings.weight":
                param.data = param.data.t().contiguous().t()
        self._packed_output = _pack_for_onednn(self.output.weight) if self.post_process else None
        return self.eval()

    def load_hf_state_dict(self, hf_state_dict: dict, strict: bool = True) -> None:
        """Load a ``transformers`` ``LlamaForCausalLM`` state dict (the parts this stage holds;
        under tensor parallelism, this rank's shard of each full tensor)."""
        ours = hf_to_ours(parameter_table(self.config), hf_state_dict)
        # a tied head's copy on a last stage reads the embedding
        own = {self.parameter_table[name].stored_as or name: p for name, p in self.named_parameters()}
        if strict:
            missing = sorted(set(own) - set(ours))
            if missing:
                raise KeyError(f"HF state dict lacks tensors for: {missing[:5]}{' …' if len(missing) > 5 else ''}")
        with torch.no_grad():  # parameter by parameter: a tied head is the embedding, not a state-dict entry
            for name, tensor in ours.items():
                if name in own:
                    own[name].copy_(parallel.shard_like(own[name], tensor))

    def hf_state_dict(self) -> dict:
        """This stage's full weights under ``LlamaForCausalLM``'s names (gathered over the
        tensor-parallel ranks: a collective call under TP)."""
        full = {k: parallel.gather_like(p, p.detach()) for k, p in self.named_parameters()}
        return ours_to_hf(self.parameter_table, full)


def get_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (≥2-D: projections, embedding, head) decay; norms don't."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
