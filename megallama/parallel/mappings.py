"""Autograd functions that move activations into and out of the tensor-parallel region.

Each forward collective has its adjoint as backward (copy <-> all-reduce, split <-> all-gather,
all-gather <-> reduce-scatter). All are the identity when the tensor-parallel size is 1.

Activations here are [batch, seq, hidden] (the model's layout), so the sequence-parallel functions
take the sequence dimension as ``dim`` with default 1; Megatron's [seq, batch, hidden] is ``dim=0``.

``start_all_reduce`` / ``start_gather`` / ``start_reduce_scatter`` are the same collectives without
autograd, started asynchronously, for hand-written backwards that overlap them with compute.
"""
import time
import weakref

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


def _split(x, dim):
    """Keep this rank's slice of ``dim``."""
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return x
    _check_divisible(x, dim, world_size, "split")
    return x.chunk(world_size, dim)[get_tensor_model_parallel_rank()].contiguous()


class PendingCollective:
    """A collective in flight (``async_op``): ``wait()`` returns its result, laid out as asked.

    Hand-written backwards start one, do the matrix multiply that does not need it, then wait:
    the communication overlaps the compute (Megatron's overlap of the sequence-parallel
    all-gather and of the input-gradient reduction with the weight-gradient multiply).

    Gloo's worker thread keeps the finished work (and so the tensors handed to it) for a moment
    after ``work.wait()`` returns. Were those the last references, the buffers would be freed there,
    late and off the main thread (the profiler's allocation records then miss the free: the
    training run looked as if it grew by megabytes an iteration). So gloo gets aliases (new tensor
    objects sharing the storage) of tensors this object keeps; ``wait()`` drops the work, waits
    until gloo has let go of every alias, then lets go of the storages itself, on this thread.
    """

    def __init__(self, work, finish, watch=False):
        self._work, self._finish = work, finish
        self._watch = watch  # gloo: hand aliases and wait for their release (other backends: as is)
        self._keep = []  # the storages handed to gloo, owned here until it let go
        self._handed = []
        self._storages = []  # (private buffer, its storage's use count before gloo got it)

    def hand(self, x, private=False):
        """``x`` for the collective: under gloo an alias of it (``x`` kept here), watched until
        gloo drops it. ``private``: a buffer made for this collective, that nothing but this object
        references until ``wait()``; gloo may also hold views of it that it made itself (the
        all-gather's output chunks), freed after the alias: the storage's use count is watched too."""
        if not self._watch:
            return x
        self._keep.append(x)
        if private:
            self._storages.append((x, _storage_uses(x)))
        alias = x.detach()
        self._handed.append(weakref.ref(alias))
        return alias

    def started(self, work):
        self._work = work
        return self

    def wait(self):
        """The result (once: the buffers are let go of here, so a second call raises)."""
        if self._finish is None:
            raise RuntimeError("PendingCollective.wait() was already called")
        if self._work is not None:
            work, self._work = self._work, None
            _wait(work)
            del work  # the last reference from this thread: gloo's worker may still hold it
            _until_released(self._handed, self._storages)
        self._handed, self._storages = [], []
        finish, self._finish = self._finish, None
        result = finish()
        self._keep = []  # freed here (not on gloo's thread) unless the result or the caller holds it
        return result


# Gloo's worker drops a finished work within microseconds; past this, stop waiting (the buffers are
# then freed late by gloo, the behaviour without this wait) rather than stall.
_RELEASE_TIMEOUT_S = 5.0


def _storage_uses(x):
    """References to ``x``'s storage (tensors sharing it, gloo's included), or None where this torch
    cannot tell."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(x.untyped_storage()._cdata)


def _until_released(refs, storages=()):
    """Wait (giving up the GIL, which gloo's thread needs to drop a Python tensor) until every
    weakly referenced alias is gone and every private buffer's storage is referenced as before."""
    def held():
        return (any(r() is not None for r in refs)
                or any(uses is not None and _storage_uses(x) != uses for x, uses in storages))

    if not held():
        return
    deadline = time.monotonic() + _RELEASE_TIMEOUT_S
    spins = 0
    while held() and time.monotonic() < deadline:
        time.sleep(0 if spins < 20 else 20e-6)  # then back off: gloo's worker may need this core
        spins += 1


def _is_gloo(group):
    return dist.get_backend(group) == "gloo"


def _wait(work):
    work.wait()


def _done(x):
    return PendingCollective(None, lambda: x)


def start_all_reduce(x):
    """Start the sum of ``x`` over the tensor-parallel ranks (into a copy)."""
    if get_tensor_model_parallel_world_size() == 1:
        return _done(x)
    x = x.clone(memory_format=torch.contiguous_format)
    group = get_tensor_model_parallel_group()
    pending = PendingCollective(None, lambda: x, watch=_is_gloo(group))
    return pending.started(dist.all_reduce(pending.hand(x, private=True), group=group, async_op=True))


def start_gather(x, dim):
    """Start the concatenation of every rank's ``x`` along ``dim``, rank order."""
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return _done(x)
    # Gloo wants the concatenated form [world * n, ...] of the output, not the stacked one.
    out = x.new_empty((world_size * x.shape[0],) + tuple(x.shape[1:]))
    group = get_tensor_model_parallel_group()
    if dim % x.dim() == 0:
        pending = PendingCollective(None, lambda: out, watch=_is_gloo(group))
    else:
        pending = PendingCollective(None, lambda: torch.cat(out.chunk(world_size), dim=dim), watch=_is_gloo(group))
    src = x.contiguous()  # a copy (private to this collective) only when ``x`` is not contiguous
    work = _all_gather_flat(pending.hand(out, private=True), pending.hand(src, private=src is not x), group=group,
                            async_op=True)
    return pending.started(work)


def start_reduce_scatter(x, dim):
    """Start the sum of ``x`` over the ranks keeping this rank's slice of ``dim``."""
    world_size = get_tensor_model_parallel_world_size()
    if world_size == 1:
        return _done(x)
    _check_divisible(x, dim, world_size, "reduce-scatter")
    group = get_tensor_model_parallel_group()
    gloo = _is_gloo(group)
    out_shape = list(x.shape)
    out_shape[dim] //= world_size
    # The flat collective scatters along the first dimension: bring the chunks of ``dim`` there.
    if dim % x.dim() != 0:
        stacked = torch.cat(x.chunk(world_size, dim))
    elif gloo:
        stacked = x.clone(memory_format=torch.contiguous_format)
    else:
        stacked = x.contiguous()
    if not gloo:
        out = x.new_empty(out_shape)
        pending = PendingCollective(None, lambda: out)
        return pending.started(_reduce_scatter_flat(out, stacked, group=group, async_op=True))
    # Gloo's reduce-scatter is an all-reduce of a copy of the input, then a copy of this rank's
    # chunk: done here on a copy owned by this thread (freed here, not on gloo's worker), the
    # concatenation above when there is one (gloo would have copied it once more).
    rank = get_tensor_model_parallel_rank()
    pending = PendingCollective(None, lambda: stacked.chunk(world_size)[rank].clone(), watch=True)
    return pending.started(dist.all_reduce(pending.hand(stacked, private=True), group=group, async_op=True))


def _all_reduce(x):
    return start_all_reduce(x).wait()


def _gather(x, dim):
    """Concatenate every rank's ``x`` along ``dim``, rank order."""
    return start_gather(x, dim).wait()


def _reduce_scatter(x, dim):
    """Sum ``x`` over the ranks and keep this rank's slice of ``dim``."""
    return start_reduce_scatter(x, dim).wait()


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
