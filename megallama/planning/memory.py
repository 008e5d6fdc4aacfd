"""Device memory of one training rank, term by term, as this codebase allocates it.

Static state per parameter held (``megallama.distributed``): the weights (2 B in bf16, 4 B in fp32),
the fp32 ``main_grad`` buffer (4 B), fp32 main weights (4 B, only for bf16 weights: fp32 weights are
their own main copy) and AdamW's two fp32 moments (8 B); the distributed optimizer (ZeRO-1) keeps
main weights and moments for 1/DP of them, and it keeps that fp32 copy of its slice in fp32 runs too.

Activations follow Korthikanti et al. (2022), re-derived for LLaMA (no dropout, RMSNorm, SwiGLU,
rotary) and for what ``megallama.model`` saves (``tests/model`` asserts the same count): per token
and layer the norm inputs ``x`` and ``h``, the two normed inputs of the fused projections, ``q k v``,
the attention output (``a`` bytes each, ``8h`` in all for LLaMA-1; ``k v`` are as narrow as the
key/value heads under grouped-query attention), ``[w1 xn, w3 xn]`` (``2f``), and in fp32 one
RMS scale per norm and the attention's log-sum-exp per head. Tensor parallelism splits the heads
(key/value heads fewer than the ranks are replicated, one per rank) and the FFN columns; sequence
parallelism splits the rest along the sequence (Megatron keeps only the sequence shard of the
gathered inputs and gathers them again in backward); full recomputation keeps each layer's input
and rebuilds one layer at a time. "selective" costs nothing here: the attention never stores its
scores. The head keeps the normed input and, per token, the loss's gradient over the vocabulary
(``a·V`` serial; ``a·V/TP`` in the vocabulary-parallel loss).

Pipelines hold several micro-batches' activations: rank ``r`` of ``p`` holds ``p − r`` under 1F1B;
under the interleaved schedule it runs ``2(p − r − 1) + (v − 1)p`` warm-up forwards of chunks of
``L/(pv)`` layers before its first backward (all ``m·v`` of them when ``m = p``).

The peak is the larger of two moments: the turn from forward to backward (activations in flight
plus the head's or a layer's working buffers) and, with the distributed optimizer over gloo
(``staged_reduce_scatter``), the end of backward, where the reduce-scatter keeps a staging copy of
every gradient bucket (4 B per parameter) until the step finishes the sync (NCCL reduces in place:
no copy). The weight write-back all-gathers into the parameters themselves: no buffer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from megallama.planning.layout import Layout, Workload

LOSS_CHUNK_TOKENS = 4096  # megallama.model.linear_cross_entropy's default chunk


@dataclass
class RankMemory:
    """Bytes on one pipeline rank at its peak; ``total`` is what must fit the device."""

    pipeline_rank: int
    parameters: int
    weights: float
    gradients: float
    main_weights: float
    optimizer_states: float
    activations: float
    inflight_forwards: int
    working_buffers: float
    data: float
    total: float
    peak_moment: str

    def to_dict(self) -> dict:
        return asdict(self)


def _padded_vocab(workload: Workload, tp: int) -> int:
    return math.ceil(workload.model.vocab_size / tp) * tp


def attention_widths(workload: Workload, tp: int) -> tuple[int, int]:
    """Per tensor-parallel rank: the width of q (and of the attention output), that of k (and v)."""
    m = workload.model
    return m.num_attention_heads // tp * m.kv_channels, max(m.num_query_groups // tp, 1) * m.kv_channels


def layer_parameters(workload: Workload, tp: int) -> int:
    m = workload.model
    h, f = m.hidden_size, m.ffn_hidden_size
    q, kv = attention_widths(workload, tp)
    return h * (2 * q + 2 * kv) + 3 * h * f // tp + 2 * h


def rank_parameters(workload: Workload, layout: Layout, rank: int) -> int:
    """Parameters one tensor-parallel rank of pipeline rank ``rank`` holds."""
    m = workload.model
    n = m.num_layers // layout.pp * layer_parameters(workload, layout.tp)
    vocab_rows = _padded_vocab(workload, layout.tp) // layout.tp * m.hidden_size
    if rank == 0:
        n += vocab_rows
    if rank == layout.pp - 1:
        n += m.hidden_size
        # A tied head is the embedding; a last stage without it holds a copy (weights, gradients and
        # optimizer state), as Megatron's does.
        if not (m.tie_word_embeddings and rank == 0):
            n += vocab_rows
    return n


def layer_activation_bytes(workload: Workload, layout: Layout, tokens: int) -> float:
    """Bytes one layer saves for backward for ``tokens`` tokens, no recomputation."""
    m, a, t = workload.model, workload.act_bytes, layout.tp
    h, f, heads = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads
    q, kv = attention_widths(workload, t)
    # this rank's q k v, attention output, [w1 xn, w3 xn], lse
    split = (2 * q + 2 * kv + 2 * f / t) * a + 4 * heads / t
    kept = 4 * h * a + 4 * 2                         # x, xn, h, xn and the two RMS scales
    if layout.sequence_parallel:
        return tokens * (split + kept / t)
    return tokens * (split + kept)


def layer_input_bytes(workload: Workload, layout: Layout, tokens: int) -> float:
    """What full recomputation keeps per layer: its input (split along the sequence under SP)."""
    sp = layout.tp if layout.sequence_parallel else 1
    return tokens * workload.model.hidden_size * workload.act_bytes / sp


def head_activation_bytes(workload: Workload, layout: Layout, tokens: int) -> float:
    """Final norm and loss of one micro-batch: saved tensors."""
    m, a, t = workload.model, workload.act_bytes, layout.tp
    sp = t if layout.sequence_parallel else 1
    norm = tokens * (m.hidden_size * a + 4) / sp
    if t == 1:  # linear_cross_entropy: hn and the loss's gradient in the activation dtype
        return norm + tokens * (m.hidden_size + m.vocab_size) * a
    # vocabulary-parallel: the normed input as received (the sequence shard under SP) and the
    # loss's gradient over this rank's columns, in the activation dtype
    return norm + tokens * (m.hidden_size * a / sp + a * _padded_vocab(workload, t) / t)


def head_working_bytes(workload: Workload, layout: Layout, tokens: int) -> float:
    """Largest buffer set alive at once in the head's forward or backward, beyond what it saves."""
    m, a, t = workload.model, workload.act_bytes, layout.tp
    h = m.hidden_size
    if t == 1:
        # The forward works in the unit-gradient buffer it saves (the fused loss kernel); the
        # backward makes the input's gradient, a chunk of scaled inputs and, unfused, the weight's
        # gradient, summed over chunks in a second buffer.
        chunk = min(tokens, LOSS_CHUNK_TOKENS)
        weight_grads = 0 if workload.gradient_accumulation_fusion else min(2, -(-tokens // chunk))
        return (chunk + tokens) * h * a + weight_grads * m.vocab_size * h * a
    # The logits are made in the gradient buffer the head saves; its backward makes the input's
    # gradient and the scaled input (gathered again first under SP) and, unfused, the weight's.
    vocab = _padded_vocab(workload, t) // t
    weight_grad = 0 if workload.gradient_accumulation_fusion else vocab * h * a
    return (2 + layout.sequence_parallel) * tokens * h * a + weight_grad


def layer_working_bytes(workload: Workload, layout: Layout, tokens: int) -> float:
    """A layer's backward buffers: the gradients of the FFN's packed input and output and, without
    gradient-accumulation fusion, the largest weight gradient before it is added to ``main_grad``
    (with it, fp32 weights and bf16 on a GPU make none; bf16 on a CPU still does, there being no
    fp32-output GEMM there: a CPU detail this GPU planner leaves out, 3% of the tests' bf16 peak)."""
    m, a, t = workload.model, workload.act_bytes, layout.tp
    h, f = m.hidden_size, m.ffn_hidden_size
    weight_grad = 0 if workload.gradient_accumulation_fusion else 2 * f * h / t * a
    return tokens * (3 * f / t + 2 * h) * a + weight_grad


def inflight_chunks(layout: Layout, micro_batches: int, rank: int) -> list[int]:
    """Model-chunk index of each forward a pipeline rank holds when its first backward starts."""
    p, v, m = layout.pp, layout.virtual, micro_batches
    if p == 1:
        return [0]
    if v == 1:
        return [0] * min(p - rank, m)
    total = m * v
    held = total if m == p else min(2 * (p - rank - 1) + (v - 1) * p + 1, total)
    return [(k % (p * v)) // p for k in range(held)]


def rank_memory(workload: Workload, layout: Layout, rank: int, staged_reduce_scatter: bool = False) -> RankMemory:
    m, a, t, p, v = workload.model, workload.act_bytes, layout.tp, layout.pp, layout.virtual
    params = rank_parameters(workload, layout, rank)
    shard = layout.dp if layout.distributed_optimizer else 1
    weights = params * a
    gradients = 4.0 * params
    if layout.distributed_optimizer:
        main_weights = 4.0 * params / shard
    else:
        main_weights = 4.0 * params if a != 4 else 0.0
    optimizer_states = 8.0 * params / shard

    tokens = layout.micro_batch_size * workload.seq_length
    micro_batches = layout.micro_batches(workload)
    chunks = inflight_chunks(layout, micro_batches, rank)
    layers_per_chunk = m.num_layers // (p * v)
    first, last = rank == 0, rank == p - 1
    per_layer = (layer_input_bytes if layout.full_recompute else layer_activation_bytes)(workload, layout, tokens)
    activations = len(chunks) * layers_per_chunk * per_layer
    if first:  # the embedding keeps its token ids (int64; plus an out-of-range mask under TP)
        activations += chunks.count(0) * tokens * (8 + (t > 1))
    head_mbs = chunks.count(v - 1) if last else 0
    activations += head_mbs * head_activation_bytes(workload, layout, tokens)
    rope_tables = v * 4 * m.max_position_embeddings * m.head_dim  # fp32 cos and sin per chunk
    data = 16.0 * tokens * micro_batches + rope_tables            # the step's token ids and labels

    working = layer_working_bytes(workload, layout, tokens)
    if layout.full_recompute:  # the layer being rebuilt holds its activations again, less its input
        working += (layer_activation_bytes(workload, layout, tokens)
                    - layer_input_bytes(workload, layout, tokens))
    if last:  # a layer's backward starts once the head's is done and its tensors are freed
        working = max(working - head_activation_bytes(workload, layout, tokens),
                      head_working_bytes(workload, layout, tokens))
    static = weights + gradients + main_weights + optimizer_states + data
    # (moment, activations alive, working buffers) — the peak is the largest sum
    moments = [("forward/backward turn", activations, working)]
    if layout.distributed_optimizer and layout.dp > 1 and staged_reduce_scatter:
        # Reduce-scatter staging copies of all buckets, alive until the sync finishes; by then
        # one micro-batch's activations are freed.
        moments.append(("end of backward (reduce-scatter staging buffers)",
                        activations * (len(chunks) - 1) / len(chunks), 4.0 * params))
    moment, activations, working = max(moments, key=lambda m: m[1] + m[2])
    total = static + activations + working
    return RankMemory(rank, params, weights, gradients, main_weights, optimizer_states, activations,
                      len(chunks), working, data, total, moment)


def training_memory(workload: Workload, layout: Layout, staged_reduce_scatter: bool = False) -> list[RankMemory]:
    """Peak bytes of every pipeline rank (all tensor- and data-parallel ranks of a stage alike);
    ``staged_reduce_scatter``: the gradient reduce-scatter copies its input (gloo; NCCL does not)."""
    return [rank_memory(workload, layout, r, staged_reduce_scatter) for r in range(layout.pp)]


def peak_rank(workload: Workload, layout: Layout) -> RankMemory:
    return max(training_memory(workload, layout), key=lambda r: r.total)
