"""Autograd functions that move activations into and out of the tensor-parallel region.

Each forward collective has its adjoint as backward (copy <-> all-reduce, split <-> all-gather,
all-gather <-> reduce-scatter). All are the identity when the tensor-parallel size is 1.

Activations here are [batch, seq, hidden] (the model's layout), so the sequence-parallel functions
take the sequence dimension as ``dim`` with default 1; Megatron's [seq, batch, hidden] is ``dim=0``.
"""
import torch
import torch.distributed as dist

from megallama.parallel.state import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)

# torch 2.13 renamed the flat-tensor collectives; older releases only have the *_tensor names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _check_divisible(x, dim, world_size, what):
    if x.shape[dim] % world_size != 0:
        raise ValueError(
            f"cannot {what} dimension {dim} of size {x.shape[dim]} (shape {tuple(x.shape)}) over "
            f"{world_size} tensor-parallel ranks: not divisible"
        )


def _all_reduce(x):
    if get_tensor_model_parallel_world_size() == 1:
        return x
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=get_tensor_model_parallel_group())
    return x


def _split(x, dim):
    """Keep this rank's slice of ``dim``."""
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return x
    _check_divisible(x, dim, world_size, "split")
    return x.chunk(world_size, dim)[get_tensor_model_parallel_rank()].contiguous()


def _gather(x, dim):
    """Concatenate every rank's ``x`` along ``dim``, rank order."""
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return x
    # Gloo wants the concatenated form [world * n, ...] of the output, not the stacked one.
    out = x.new_empty((world_size * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_flat(out, x.contiguous(), group=get_tensor_model_parallel_group())
    if dim % x.dim() == 0:
        return out
    return torch.cat(out.chunk(world_size), dim=dim)


def _reduce_scatter(x, dim):
    """Sum ``x`` over the ranks and keep this rank's slice of ``dim``."""
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return x
    _check_divisible(x, dim, world_size, "reduce-scatter")
    # The flat collective scatters along the first dimension: bring the chunks of ``dim`` there.
    stacked = x.contiguous() if dim % x.dim() == 0 else torch.cat(x.chunk(world_size, dim))
    out_shape = list(x.shape)
    out_shape[dim] //= world_size
    out = x.new_empty(out_shape)
    _reduce_scatter_flat(out, stacked, group=get_tensor_model_parallel_group())
    return out


class _CopyToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, -1)


class _GatherFromTensorParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1)


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _split(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim), None


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, tensor_parallel_output_grad):
        ctx.dim = dim
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter(grad, ctx.dim), None, None
        return _split(grad, ctx.dim), None, None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.dim), None


def copy_to_tensor_model_parallel_region(x):
    """Identity forward; all-reduce of the gradient (the input feeds every rank's partial work)."""
    return _CopyToTensorParallelRegion.apply(x)


def reduce_from_tensor_model_parallel_region(x):
    """All-reduce (sum of the ranks' partial results) forward; identity backward."""
    return _ReduceFromTensorParallelRegion.apply(x)


def scatter_to_tensor_model_parallel_region(x):
    """Keep this rank's slice of the last dimension; all-gather of the gradient."""
    return _ScatterToTensorParallelRegion.apply(x)


def gather_from_tensor_model_parallel_region(x):
    """All-gather along the last dimension; the gradient is split back."""
    return _GatherFromTensorParallelRegion.apply(x)


def scatter_to_sequence_parallel_region(x, dim=1):
    """Keep this rank's slice of the sequence dimension ``dim``; all-gather of the gradient."""
    return _ScatterToSequenceParallelRegion.apply(x, dim)


def gather_from_sequence_parallel_region(x, dim=1, tensor_parallel_output_grad=True):
    """All-gather along the sequence dimension ``dim``.

    The gradient is reduce-scattered when the gathered tensor feeds tensor-parallel work (each
    rank's gradient is then a partial sum: the default), or just split when every rank computed
    the same full gradient (``tensor_parallel_output_grad=False``).
    """
    return _GatherFromSequenceParallelRegion.apply(x, dim, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x, dim=1):
    """Sum over the ranks and keep this rank's slice of the sequence dimension ``dim``; all-gather
    of the gradient."""
    return _ReduceScatterToSequenceParallelRegion.apply(x, dim)
