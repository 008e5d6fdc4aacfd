"""Time of one optimizer step for a layout, term by term.

Per micro-batch on the slowest pipeline stage (the last: it also runs the output layer and loss):

* compute: the model FLOPs of ``megallama.training.flops`` (plus one more forward of the layers
  under full recomputation) at ``mfu`` of the GPU's bf16 peak;
* memory-bound work: the elementwise passes (norms, rotary, SwiGLU, residual adds; the loss's fp32
  passes over the vocabulary), bytes over the HBM bandwidth;
* tensor parallelism: per layer, 2 all-reduces forward and 2 backward of the ``[b, s, h]``
  activations, or with sequence parallelism 2 all-gathers + 2 reduce-scatters forward and 2 + 2
  backward plus the 2 re-gathers of the saved sequence shards (ring: ``(t−1)/t`` of the bytes per
  all-gather/reduce-scatter, twice that per all-reduce) over NVLink; exposed (this codebase runs them
  between the multiplies);
* pipeline: each chunk's activation sent forward and its gradient back (network bandwidth when
  stages are on different nodes).

Step = micro-batches × that, plus the pipeline bubble ``(p−1)`` (1F1B) or ``(p−1)/v`` (interleaved)
micro-batch times scaled by the measured bubble factor; plus the data-parallel gradient reduction
not hidden behind the last micro-batch's backward (buckets start as they fill), the distributed
optimizer's weight all-gather (exposed, or with ``--overlap-param-gather`` what the first
micro-batch's forward does not hide), and the optimizer step at the HBM bandwidth.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from megallama.distributed.data_parallel import DEFAULT_BUCKET_SIZE
from megallama.planning.hardware import GpuSpec
from megallama.planning.layout import Layout, Workload
from megallama.planning.memory import attention_widths, rank_parameters
from megallama.training.flops import estimate_flops

# Bytes per vocabulary entry and token of the loss's fp32 passes (logits cast, max, subtract,
# exp, sum, scale; read + write each) beyond the two activation-dtype copies.
LOSS_FP32_BYTES = 28
# AdamW on fp32 main weights: read weight, grad, two moments; write weight, two moments (28 B),
# plus the gradient-norm read and the clipping read/write (12 B) and the bf16 copy's read (2 B).
OPTIMIZER_BYTES_PER_OWNED_PARAM = 42


@dataclass
class StepTime:
    compute: float
    memory_bound: float
    tensor_parallel: float
    pipeline_p2p: float
    micro_batch: float
    micro_batches: int
    bubble: float
    data_parallel_exposed: float
    optimizer: float
    total: float
    tokens_per_s_per_gpu: float

    def to_dict(self) -> dict:
        return asdict(self)


def _flops(workload: Workload, num_layers: int, vocab_size: int, sequences: int) -> float:
    m = workload.model
    return estimate_flops(num_layers=num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
                          seq_length=workload.seq_length, vocab_size=vocab_size, num_sequences=sequences,
                          num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
                          kv_channels=m.kv_channels)


def _layer_flops(workload: Workload, num_layers: int, sequences: int) -> float:
    return _flops(workload, num_layers, 0, sequences)


def _head_flops(workload: Workload, sequences: int) -> float:
    return _flops(workload, 0, workload.model.vocab_size, sequences)


def elementwise_bytes(workload: Workload, layout: Layout, tokens: int, num_layers: int, head: bool) -> float:
    """HBM traffic of the memory-bound passes of one micro-batch on one GPU (forward + backward)."""
    m, a, t = workload.model, workload.act_bytes, layout.tp
    h, f = m.hidden_size, m.ffn_hidden_size
    q, kv = attention_widths(workload, t)
    sp = t if layout.sequence_parallel else 1
    # norms + residual adds; this rank's rotary of q and k and copy of v (read + write, forward and
    # backward: 12h for LLaMA-1) and SwiGLU
    replicated, split = 22 * h, 4 * q + 8 * kv + 11 * f / t
    if layout.full_recompute:
        replicated, split = replicated + 10 * h, split + 2 * q + 4 * kv + 3 * f / t
    total = tokens * num_layers * a * (replicated / sp + split)
    if head:
        total += tokens * m.vocab_size / t * (LOSS_FP32_BYTES + 2 * a)
    return total


def tensor_parallel_seconds(workload: Workload, layout: Layout, gpu: GpuSpec, tokens: int, num_layers: int) -> float:
    t = layout.tp
    if t == 1:
        return 0.0
    units = 10 if layout.sequence_parallel else 8     # all-gather / reduce-scatter volumes per layer
    if layout.full_recompute:
        units += 4
    volume = (units * num_layers + 2) * tokens * workload.model.hidden_size * workload.act_bytes * (t - 1) / t
    bandwidth = gpu.nvlink_gb_s if t <= gpu.gpus_per_node else gpu.network_gb_s
    return volume / (bandwidth * 1e9)


def step_time(workload: Workload, layout: Layout, gpu: GpuSpec, mfu: float,
              bubble_1f1b: float = 1.0, bubble_interleaved: float = 1.0,
              overlap_communication: bool = False, overlap_param_gather: bool = False) -> StepTime:
    """``overlap_communication``: model an implementation that hides the tensor-parallel
    collectives behind the matrix multiplies and the weight all-gather behind the next forward
    (the paper's §2.4, Megatron's ``--tp-comm-overlap --overlap-param-gather``); this codebase
    runs its TP collectives between the multiplies. ``overlap_param_gather``: the weight
    all-gather alone hidden, as ``pretrain --overlap-param-gather`` runs it."""
    m, a, t, p, v = workload.model, workload.act_bytes, layout.tp, layout.pp, layout.virtual
    b = layout.micro_batch_size
    tokens = b * workload.seq_length
    layers = m.num_layers // p
    flops = _layer_flops(workload, layers, b) * (4 / 3 if layout.full_recompute else 1) + _head_flops(workload, b)
    compute = flops / t / (gpu.bf16_tflops * 1e12 * mfu)
    memory_bound = elementwise_bytes(workload, layout, tokens, layers, head=True) / (gpu.hbm_gb_s * 1e9)
    tp_comm = tensor_parallel_seconds(workload, layout, gpu, tokens, layers)
    if overlap_communication:
        tp_comm = max(0.0, tp_comm - compute)
    multi_node = layout.world_size > gpu.gpus_per_node
    p2p = 0.0
    if p > 1:
        sp = t if layout.sequence_parallel else 1
        across = multi_node and t * layout.dp >= gpu.gpus_per_node
        bandwidth = gpu.network_gb_s if across else gpu.nvlink_gb_s
        p2p = 2 * v * tokens * m.hidden_size * a / sp / (bandwidth * 1e9)
    per_micro = compute + memory_bound + tp_comm + p2p
    n_micro = layout.micro_batches(workload)
    if p == 1:
        bubble = 0.0
    elif v == 1:
        bubble = (p - 1) * bubble_1f1b * per_micro
    else:
        bubble = (p - 1) / v * bubble_interleaved * per_micro

    params = max(rank_parameters(workload, layout, r) for r in range(p))
    dp_exposed = 0.0
    if layout.dp > 1:
        d = layout.dp
        # NCCL reduces inside a node over NVLink first, so the network carries 1/k of the bytes
        # when k ranks of the data-parallel group share a node (and its k network cards).
        per_node = max(1, gpu.gpus_per_node // (t * p))
        bandwidth = min(gpu.nvlink_gb_s, gpu.network_gb_s * per_node) if multi_node else gpu.nvlink_gb_s
        bandwidth *= 1e9
        ring = (d - 1) / d / bandwidth
        reduce = (1 if layout.distributed_optimizer else 2) * 4 * params * ring
        last_bucket = (1 if layout.distributed_optimizer else 2) * 4 * min(params, DEFAULT_BUCKET_SIZE) * ring
        backward_window = 2 / 3 * (compute + memory_bound)
        dp_exposed = max(last_bucket, reduce - backward_window)
        if layout.distributed_optimizer:
            gather = a * params * ring
            hidden = overlap_communication or overlap_param_gather
            dp_exposed += max(0.0, gather - compute / 3) if hidden else gather
    owned = params / (layout.dp if layout.distributed_optimizer else 1)
    optimizer = (4 * params + OPTIMIZER_BYTES_PER_OWNED_PARAM * owned + a * params) / (gpu.hbm_gb_s * 1e9)
    total = n_micro * per_micro + bubble + dp_exposed + optimizer
    return StepTime(compute, memory_bound, tp_comm, p2p, per_micro, n_micro, bubble, dp_exposed, optimizer,
                    total, workload.tokens_per_step / total / layout.world_size)


def solve_mfu(measured, gpu: GpuSpec) -> float:
    """The ``mfu`` at which :func:`step_time` reproduces a measured single-GPU run."""
    workload = Workload(measured.model, measured.seq_length, measured.global_batch_size, bf16=True)
    layout = Layout(micro_batch_size=measured.micro_batch_size)
    at_full_peak = step_time(workload, layout, gpu, mfu=1.0)
    measured_seconds = workload.tokens_per_step / measured.tokens_per_s
    compute = at_full_peak.compute * at_full_peak.micro_batches
    other = at_full_peak.total - compute
    if measured_seconds <= other:
        raise ValueError(f"the measured step ({measured_seconds:.3f} s) is shorter than its memory-bound "
                         f"part alone ({other:.3f} s): the GPU figures do not fit the measurement")
    return compute / (measured_seconds - other)
