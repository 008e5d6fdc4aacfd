"""Tensor-parallel linear and embedding layers (no biases: LLaMA has none).

``ColumnParallelLinear`` splits the output features (weight [out / TP, in]); ``RowParallelLinear``
splits the input features (weight [out, in / TP]) and sums the ranks' partial products. A column
layer followed by a row layer (attention, feed-forward) needs one all-reduce forward and one
backward; with sequence parallelism that all-reduce becomes an all-gather before the column layer
and a reduce-scatter after the row layer, and the activations between blocks stay split along the
sequence.

Initialisation draws the full weight from the default generator and keeps this rank's shard, so a
model built under TP with ``torch.manual_seed(s)`` holds exactly the serial model's weights.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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
from megallama.parallel.state import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)


def divide(numerator, denominator, what):
    """``numerator // denominator``, or a ValueError naming ``what`` when it does not divide."""
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def pad_to_multiple(size, multiple):
    return math.ceil(size / multiple) * multiple


def shard_tensor(full, dim, *, stacked=1, padded_size=None, rank=None, world_size=None):
    """This tensor-parallel rank's slice of ``full`` along ``dim``.

    ``stacked``: ``dim`` holds that many equal blocks that are split separately, as in a fused
    [wq; wk; wv] weight of shape [3 * H * d, h] where each rank keeps [3 * H * d / TP, h] made of
    its rows of each block. ``padded_size``: zero-pad ``dim`` to this size first (a vocabulary not
    divisible by TP). The result owns its storage (only the shard), never a view of ``full``.
    """
    rank = get_tensor_model_parallel_rank() if rank is None else rank
    world_size = get_tensor_model_parallel_world_size() if world_size is None else world_size
    dim = dim % full.dim()
    if padded_size is not None and padded_size != full.shape[dim]:
        if stacked != 1:
            raise ValueError("padding a stacked weight is not supported")
        pad = [0, 0] * (full.dim() - dim - 1) + [0, padded_size - full.shape[dim]]
        full = F.pad(full, pad)
    block = divide(full.shape[dim], stacked, f"dimension {dim} of {tuple(full.shape)} over {stacked} blocks")
    divide(block, world_size, f"block size {block} of dimension {dim} of {tuple(full.shape)}")
    blocks = full.unflatten(dim, (stacked, block))
    shard = blocks.chunk(world_size, dim + 1)[rank].flatten(dim, dim + 1)
    # Always a copy: a contiguous block (rows of a vocabulary, TP=1) would otherwise be a view that
    # keeps the whole of ``full`` alive, (TP - 1) / TP of it wasted in every parameter made from it.
    return shard.clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def gather_tensor(local, dim, *, stacked=1, full_size=None):
    """Inverse of ``shard_tensor`` over the tensor-parallel group (no autograd): every rank gets
    the full tensor, padding trimmed to ``full_size``."""
    world_size = get_tensor_model_parallel_world_size()
    dim = dim % local.dim()
    if world_size == 1:
        full = local
    else:
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local.contiguous(), group=get_tensor_model_parallel_group())
        block = divide(local.shape[dim], stacked, f"dimension {dim} of {tuple(local.shape)} over {stacked} blocks")
        full = torch.cat([p.unflatten(dim, (stacked, block)) for p in parts], dim + 1).flatten(dim, dim + 1)
    if full_size is not None:
        full = full.narrow(dim, 0, full_size)
    return full.clone()


def init_method_normal(std):
    def init_(tensor):
        return nn.init.normal_(tensor, mean=0.0, std=std)

    return init_


def _master_weight_shard(shape, init_method, dim, stacked, padded_size, dtype, device):
    """Draw the full weight as the serial model would, then keep this rank's shard."""
    master = torch.empty(shape, dtype=dtype, device=device)
    with torch.no_grad():
        init_method(master)
    param = nn.Parameter(shard_tensor(master, dim, stacked=stacked, padded_size=padded_size))
    # Read by the helpers below and by norms over the model (split vs replicated parameters).
    param.tensor_model_parallel = True
    param.partition_dim, param.partition_stack = dim, stacked
    param.full_shape, param.padded_size = tuple(shape), padded_size
    return param


def is_tensor_parallel(param):
    """True for a parameter split over the tensor-parallel ranks (false for replicated norms)."""
    return getattr(param, "tensor_model_parallel", False)


@torch.no_grad()
def init_parameter_(param, init_method):
    """Re-initialise ``param`` as the serial model would: a split parameter gets this rank's shard
    of a full tensor drawn with ``init_method`` (same numbers on every rank for the same seed)."""
    if not is_tensor_parallel(param) or get_tensor_model_parallel_world_size() == 1:
        init_method(param)
        return
    master = init_method(torch.empty(param.full_shape, dtype=param.dtype, device=param.device))
    param.copy_(shard_tensor(master, param.partition_dim, stacked=param.partition_stack,
                             padded_size=param.padded_size))


def shard_like(param, full):
    """This rank's part of ``full`` (a whole, unpadded tensor) laid out as ``param`` is."""
    if not is_tensor_parallel(param):
        return full
    return shard_tensor(full, param.partition_dim, stacked=param.partition_stack, padded_size=param.padded_size)


def gather_like(param, local):
    """The whole tensor of which ``local`` is this rank's part, laid out as ``param`` is (collective
    over the tensor-parallel group for a split parameter)."""
    if not is_tensor_parallel(param):
        return local
    return gather_tensor(local, param.partition_dim, stacked=param.partition_stack,
                         full_size=param.full_shape[param.partition_dim])


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
            grad_w = grad_y.reshape(-1, grad_y.shape[-1]).t() @ total.reshape(-1, total.shape[-1])
        return (reduction.wait() if reduction is not None else None), grad_w, None


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split along its output rows: this rank computes y[..., its columns].

    gather_output: all-gather the columns so that every rank returns the full y.
    sequence_parallel: the input is split along ``sequence_dim``; it is all-gathered first (and the
        gradient reduce-scattered back). Only the split input is kept for backward.
    stacked: the output rows are that many fused blocks, each split separately (fused q/k/v: 3).
    pad_output: allow ``output_size`` not divisible by TP by padding it with zero rows (a
        vocabulary); a gathered output is trimmed back to ``output_size``.
    """

    def __init__(self, input_size, output_size, *, gather_output=False, init_method=None,
                 sequence_parallel=False, sequence_dim=1, stacked=1, pad_output=False,
                 dtype=None, device=None):
        super().__init__()
        world_size = get_tensor_model_parallel_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.padded_output_size = pad_to_multiple(output_size, world_size) if pad_output else output_size
        self.output_size_per_partition = divide(self.padded_output_size, world_size, "output size")
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.sequence_dim = sequence_dim
        self.stacked = stacked
        self.weight = _master_weight_shard(
            (output_size, input_size), init_method or init_method_normal(0.02), 0, stacked,
            self.padded_output_size, dtype, device,
        )

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
            y = gather_from_tensor_model_parallel_region(y)
            if self.stacked > 1:  # rank-major [rank][block] columns -> the serial [block][rank] order
                tp = get_tensor_model_parallel_world_size()
                y = y.unflatten(-1, (tp, self.stacked, -1)).transpose(-3, -2).flatten(-3)
            if self.padded_output_size != self.output_size:
                y = y[..., : self.output_size]
        return y

    def load_full_weight(self, full):
        """Copy this rank's shard of the full [output_size, input_size] weight."""
        with torch.no_grad():
            self.weight.copy_(shard_tensor(full, 0, stacked=self.stacked, padded_size=self.padded_output_size))

    def full_weight(self):
        """The full [output_size, input_size] weight, gathered from every rank."""
        return gather_tensor(self.weight.detach(), 0, stacked=self.stacked, full_size=self.output_size)

    def extra_repr(self):
        return (f"in={self.input_size}, out={self.output_size} ({self.output_size_per_partition} on this rank), "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(nn.Module):
    """y = x W^T with W split along its input columns: this rank's partial products are summed.

    input_is_parallel: the input already holds this rank's slice of the last dimension (the output
        of a column-parallel layer); otherwise it is split here.
    sequence_parallel: the sum is reduce-scattered along ``sequence_dim`` instead of all-reduced.
    """

    def __init__(self, input_size, output_size, *, input_is_parallel=True, init_method=None,
                 sequence_parallel=False, sequence_dim=1, stacked=1, dtype=None, device=None):
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("a sequence-parallel RowParallelLinear needs input_is_parallel=True")
        world_size = get_tensor_model_parallel_world_size()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, world_size, "input size")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.sequence_dim = sequence_dim
        self.stacked = stacked
        self.weight = _master_weight_shard(
            (output_size, input_size), init_method or init_method_normal(0.02), 1, stacked, None, dtype, device,
        )

    def forward(self, x):
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        return self.parallel_output(F.linear(x, self.weight))

    def parallel_output(self, y):
        """Sum this rank's partial product ``y`` with the other ranks' (reduce-scattered along the
        sequence under sequence parallelism). For callers that multiply by ``self.weight`` themselves."""
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(y, self.sequence_dim)
        return reduce_from_tensor_model_parallel_region(y)

    def load_full_weight(self, full):
        with torch.no_grad():
            self.weight.copy_(shard_tensor(full, 1, stacked=self.stacked))

    def full_weight(self):
        return gather_tensor(self.weight.detach(), 1, stacked=self.stacked)

    def extra_repr(self):
        return (f"in={self.input_size} ({self.input_size_per_partition} on this rank), out={self.output_size}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary: each rank looks up the ids in its range (zeros
    elsewhere) and the ranks' results are summed. A vocabulary not divisible by TP is padded with
    zero rows that no valid id reaches.

    sequence_parallel: the sum is reduce-scattered along ``sequence_dim`` (the output enters the
        sequence-parallel region) instead of all-reduced.
    """

    def __init__(self, num_embeddings, embedding_dim, *, init_method=None, sequence_parallel=False,
                 sequence_dim=1, dtype=None, device=None):
        super().__init__()
        world_size = get_tensor_model_parallel_world_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padded_num_embeddings = pad_to_multiple(num_embeddings, world_size)
        self.num_embeddings_per_partition = self.padded_num_embeddings // world_size
        self.vocab_start = get_tensor_model_parallel_rank() * self.num_embeddings_per_partition
        self.sequence_parallel = sequence_parallel
        self.sequence_dim = sequence_dim
        self.weight = _master_weight_shard(
            (num_embeddings, embedding_dim), init_method or nn.init.normal_, 0, 1,
            self.padded_num_embeddings, dtype, device,
        )

    def forward(self, input_ids):
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.num_embeddings):
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

    def load_full_weight(self, full):
        with torch.no_grad():
            self.weight.copy_(shard_tensor(full, 0, padded_size=self.padded_num_embeddings))

    def full_weight(self):
        return gather_tensor(self.weight.detach(), 0, full_size=self.num_embeddings)

    def extra_repr(self):
        return (f"{self.num_embeddings}, {self.embedding_dim} ({self.num_embeddings_per_partition} rows on "
                f"this rank), sequence_parallel={self.sequence_parallel}")
