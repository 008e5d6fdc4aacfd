"""Tensor-parallel linear and embedding layers (no biases: LLaMA has none).

``ColumnParallelLinear`` splits the output features (weight [out / TP, in]); ``RowParallelLinear``
splits the input features (weight [out, in / TP]) and sums the ranks' partial products. A column
layer followed by a row layer (attention, feed-forward) needs one all-reduce forward and one
backward; with sequence parallelism that all-reduce becomes an all-gather before the column layer
and a reduce-scatter after the row layer, and the activations between blocks stay split along the
sequence.

Initialisation draws the full weight from the default generator and keeps this rank's shard, so a
model built under TP with ``torch.manual_seed(s)`` holds exactly the serial model's weights.

Weight gradients of the hand-written backwards go through :func:`weight_grad`, which accumulates
them straight into ``main_grad`` where ``DistributedDataParallel`` fuses gradient accumulation.
"""
import torch
import torch.nn.functional as F
from torch import nn

from megallama import host_checks
from megallama.ops import kernels
from megallama.parallel.mappings import (
    PendingCollective,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
    start_all_reduce,
    start_gather,
    start_reduce_scatter,
)
from megallama.parallel.split import TensorSplit, is_tensor_parallel
from megallama.parallel.state import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)


def init_method_normal(std):
    def init_(tensor):
        return nn.init.normal_(tensor, mean=0.0, std=std)

    return init_


def _master_weight_shard(shape, init_method, split, dtype, device):
    """Draw the full weight as the serial model would, then keep this rank's shard."""
    master = torch.empty(shape, dtype=dtype, device=device)
    with torch.no_grad():
        init_method(master)
    tp = get_tensor_model_parallel_world_size()
    param = nn.Parameter(split.shard(master, get_tensor_model_parallel_rank(), tp))
    # Read by shard_like/gather_like, checkpoints and norms over the model (split vs replicated).
    param.tp_split, param.full_shape = split, tuple(shape)
    return param


@torch.no_grad()
def init_parameter_(param, init_method):
    """Re-initialise ``param`` as the serial model would: a split parameter gets this rank's shard
    of a full tensor drawn with ``init_method`` (same numbers on every rank for the same seed)."""
    if not is_tensor_parallel(param) or get_tensor_model_parallel_world_size() == 1:
        init_method(param)
        return
    master = init_method(torch.empty(param.full_shape, dtype=param.dtype, device=param.device))
    param.copy_(shard_like(param, master))


def shard_like(param, full):
    """This rank's part of ``full`` (a whole, unpadded tensor) laid out as ``param`` is."""
    if not is_tensor_parallel(param):
        return full
    return param.tp_split.shard(full, get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size())


def gather_like(param, local):
    """The whole tensor of which ``local`` is this rank's part, laid out as ``param`` is (collective
    over the tensor-parallel group for a split parameter)."""
    if not is_tensor_parallel(param):
        return local
    return param.tp_split.gather(local, get_tensor_model_parallel_world_size(), get_tensor_model_parallel_group())


def _split_of(split, dim, size, pad=False):
    """``split`` checked against the layer (dim and total size), or a plain one-part split."""
    if split is None:
        return TensorSplit(dim, (size,), pad)
    if split.dim != dim or sum(split.parts) != size:
        raise ValueError(f"a split along dim {split.dim} with parts {list(split.parts)} does not fit a layer "
                         f"splitting dim {dim} of size {size}")
    return split


def main_grad_signal(weight, fusable=True):
    """What a backward calls after adding ``weight``'s gradient into ``weight.main_grad`` itself:
    set by ``DistributedDataParallel(gradient_accumulation_fusion=True)``; None where the gradient
    must be returned instead (no such DDP, or ``fusable`` False: a weight whose gradient has
    another term, as a tied embedding's, or needs a collective first, as replicated heads')."""
    return getattr(weight, "signal_main_grad_added", None) if fusable else None


def weight_grad(weight, grad_out, x, fusable=True):
    """The gradient of ``weight`` in ``y = x @ weight.T`` (``grad_out`` [tokens, out], ``x``
    [tokens, in]) for a backward to return. With gradient-accumulation fusion (see
    :func:`main_grad_signal`) the product is added into ``weight.main_grad`` by the GEMM itself, in
    fp32, with no gradient tensor in the weight's dtype and no separate add, and None is returned."""
    signal = main_grad_signal(weight, fusable)
    if signal is None:
        return grad_out.t() @ x
    kernels.wgrad_accumulate_(weight.main_grad, grad_out, x)
    signal()
    return None


class _Linear(torch.autograd.Function):
    """``F.linear(x, weight)`` whose weight gradient goes through :func:`weight_grad`."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(weight, grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1]))
        return grad_x, grad_w


def linear(x, weight):
    """``F.linear(x, weight)``; under autograd, with gradient-accumulation fusion for a weight that
    has it (the plain op otherwise: nothing to fuse into)."""
    if torch.is_grad_enabled() and main_grad_signal(weight) is not None:
        return _Linear.apply(x, weight)
    return F.linear(x, weight)


class _ColumnParallelMatmul(torch.autograd.Function):
    """``gather(x) @ weight.T`` for a column-parallel ``layer``, saving ``x`` as received.

    Backward re-gathers ``x`` while it computes the input gradient, then reduces that gradient
    while it computes the weight gradient: each collective overlaps a matrix multiply.
    """

    @staticmethod
    def forward(ctx, x, weight, layer):
        ctx.layer = layer
        ctx.save_for_backward(x, weight)
        return F.linear(layer.gather_input(x), weight)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        gather = ctx.layer.start_input_gather(x) if ctx.needs_input_grad[1] else None
        reduction = ctx.layer.start_input_grad_reduction(grad_y @ weight) if ctx.needs_input_grad[0] else None
        grad_w = None
        if gather is not None:
            total = gather.wait()
            grad_w = weight_grad(weight, grad_y.reshape(-1, grad_y.shape[-1]), total.reshape(-1, total.shape[-1]),
                                 ctx.layer.fusable_wgrad)
        return (reduction.wait() if reduction is not None else None), grad_w, None


class _ShardedWeight(nn.Module):
    """A layer whose ``weight`` is this rank's shard of a full tensor (how it is split: the
    parameter's own attributes, read by :func:`shard_like` and :func:`gather_like`)."""

    def load_full_weight(self, full):
        """Copy this rank's shard of the full weight."""
        with torch.no_grad():
            self.weight.copy_(shard_like(self.weight, full))

    def full_weight(self):
        """The full weight, gathered from every rank."""
        return gather_like(self.weight, self.weight.detach())


class ColumnParallelLinear(_ShardedWeight):
    """y = x W^T with W split along its output rows: this rank computes y[..., its columns].

    gather_output: all-gather the columns so that every rank returns the full y.
    sequence_parallel: the input is split along ``sequence_dim``; it is all-gathered first (and the
        gradient reduce-scattered back). Only the split input is kept for backward.
    split: how the output rows are split (a ``TensorSplit`` along dim 0): fused parts, each split
        separately (q/k/v), or one part padded to a multiple of TP (a vocabulary); a gathered
        output is put back in the full order and trimmed to ``output_size``. Default: one part.
    """

    def __init__(self, input_size, output_size, *, gather_output=False, init_method=None,
                 sequence_parallel=False, sequence_dim=1, split=None, dtype=None, device=None):
        super().__init__()
        world_size = get_tensor_model_parallel_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.split = _split_of(split, 0, output_size)
        # this rank's rows of each fused part, and whether some are another rank's too (KV heads)
        self.local_parts = self.split.local_parts(world_size)
        self.has_replicas = self.split.has_replicas(world_size)
        # Whether weight_grad may accumulate this weight's gradient into main_grad by itself:
        # replicated rows need a sum over ranks first; a head tied to the embedding turns it off.
        self.fusable_wgrad = not self.has_replicas
        self.output_size_per_partition = sum(self.local_parts)
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.sequence_dim = sequence_dim
        self.weight = _master_weight_shard(
            (output_size, input_size), init_method or init_method_normal(0.02), self.split, dtype, device)

    # For hand-written backwards that multiply by ``self.weight`` themselves: they save the input
    # as received (this rank's sequence shard under sequence parallelism, 1/TP of the gathered
    # one), gather it for the forward multiply and again in backward (Megatron's behaviour).
    def gather_input(self, x):
        """``x`` as this rank's matrix multiply needs it, no autograd: all-gathered along the
        sequence under sequence parallelism, else as is."""
        return self.start_input_gather(x).wait()

    def start_input_gather(self, x):
        """``gather_input`` started asynchronously (for a backward to overlap with compute)."""
        if self.sequence_parallel:
            return start_gather(x, self.sequence_dim)
        return PendingCollective(None, lambda: x)

    def start_input_grad_reduction(self, grad):
        """Start turning this rank's gradient of the gathered input (a partial sum over its output
        columns) into the gradient of the input as received: reduce-scattered along the sequence
        under sequence parallelism, else all-reduced."""
        if self.sequence_parallel:
            return start_reduce_scatter(grad, self.sequence_dim)
        return start_all_reduce(grad)

    def local_output(self, x):
        """This rank's output columns of ``x W^T`` (never gathered)."""
        return _ColumnParallelMatmul.apply(x, self.weight, self)

    def forward(self, x):
        y = self.local_output(x)
        if self.gather_output:
            y = gather_from_tensor_model_parallel_region(y)  # the ranks' columns side by side
            y = self.split.rank_major_to_full(y, get_tensor_model_parallel_world_size(), dim=-1)
        return y

    def extra_repr(self):
        return (f"in={self.input_size}, out={self.output_size} ({self.output_size_per_partition} on this rank), "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_ShardedWeight):
    """y = x W^T with W split along its input columns: this rank's partial products are summed.

    input_is_parallel: the input already holds this rank's slice of the last dimension (the output
        of a column-parallel layer); otherwise it is split here.
    sequence_parallel: the sum is reduce-scattered along ``sequence_dim`` instead of all-reduced.
    """

    def __init__(self, input_size, output_size, *, input_is_parallel=True, init_method=None,
                 sequence_parallel=False, sequence_dim=1, split=None, dtype=None, device=None):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("a sequence-parallel RowParallelLinear needs input_is_parallel=True")
        world_size = get_tensor_model_parallel_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.split = _split_of(split, 1, input_size)
        self.input_size_per_partition = self.split.local_size(world_size)
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.sequence_dim = sequence_dim
        self.weight = _master_weight_shard(
            (output_size, input_size), init_method or init_method_normal(0.02), self.split, dtype, device)

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        return self.parallel_output(linear(x, self.weight))

    def parallel_output(self, y):
        """Sum this rank's partial product ``y`` with the other ranks' (reduce-scattered along the
        sequence under sequence parallelism). For callers that multiply by ``self.weight`` themselves."""
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(y, self.sequence_dim)
        return reduce_from_tensor_model_parallel_region(y)

    def extra_repr(self):
        return (f"in={self.input_size} ({self.input_size_per_partition} on this rank), out={self.output_size}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(_ShardedWeight):
    """Embedding table split along the vocabulary: each rank looks up the ids in its range (zeros
    elsewhere) and the ranks' results are summed. A vocabulary not divisible by TP is padded with
    zero rows that no valid id reaches.

    sequence_parallel: the sum is reduce-scattered along ``sequence_dim`` (the output enters the
        sequence-parallel region) instead of all-reduced.
    """

    def __init__(self, num_embeddings, embedding_dim, *, init_method=None, sequence_parallel=False,
                 sequence_dim=1, split=None, dtype=None, device=None):
        super().__init__()
        world_size = get_tensor_model_parallel_world_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.split = _split_of(split, 0, num_embeddings, pad=True)
        if not self.split.pad_to_tp or len(self.split.parts) != 1:
            raise ValueError("VocabParallelEmbedding's split is one part padded for TP (pad_to_tp=True)")
        self.num_embeddings_per_partition = self.split.local_size(world_size)
        self.vocab_start = get_tensor_model_parallel_rank() * self.num_embeddings_per_partition
        self.sequence_parallel = sequence_parallel
        self.sequence_dim = sequence_dim
        self.weight = _master_weight_shard(
            (num_embeddings, embedding_dim), init_method or nn.init.normal_, self.split, dtype, device)

    def forward(self, input_ids):
        # On a device the trainer checked the host copy: reading the ids here would stall the step.
        if host_checks.readable_without_sync(input_ids) and input_ids.numel() and \
                (input_ids.min() < 0 or input_ids.max() >= self.num_embeddings):
            raise IndexError(
                f"token ids must lie in [0, {self.num_embeddings}), got min {int(input_ids.min())} "
                f"and max {int(input_ids.max())}"
            )
        if get_tensor_model_parallel_world_size() == 1:
            out = F.embedding(input_ids, self.weight)
        else:
            local = input_ids - self.vocab_start
            outside = (local < 0) | (local >= self.num_embeddings_per_partition)
            out = F.embedding(local.masked_fill(outside, 0), self.weight)
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.sequence_dim)
        return reduce_from_tensor_model_parallel_region(out)

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim} ({self.num_embeddings_per_partition} rows on "
                f"this rank), sequence_parallel={self.sequence_parallel}")
