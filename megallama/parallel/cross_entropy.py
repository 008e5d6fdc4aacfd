"""Cross-entropy over logits split along the vocabulary, without ever gathering them.

Each rank holds logits[..., its vocabulary range]. A fused kernel gives each row's local max, sum of
exponentials (relative to that max) and, on the rank holding it, the target's logit; two all-reduces
over the tensor-parallel group make them global (the max, then the rescaled sums and the target
logit together): loss = max + log(sum exp(z - max)) - z_target. A second kernel turns this rank's
logits, in their dtype, into the loss's gradient for a unit upstream gradient (softmax minus the
one-hot target on this rank's columns), which is all the backward keeps: a copy of the logits given
to ``vocab_parallel_cross_entropy``; the logits themselves in ``vocab_parallel_linear_cross_entropy``,
which makes them.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megallama import host_checks, ops
from megallama.parallel.layers import weight_grad

from megallama.parallel.state import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)


def _all_reduce(x, op):
    if get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(x, op=op, group=get_tensor_model_parallel_group())
    return x


def _loss_and_unit_grad_(logits, target, vocab_size, ignore_index):
    """Per-token loss of this rank's logits ``[tokens, local vocabulary]`` (any ``target`` shape of
    ``tokens`` elements); ``logits`` becomes the loss's gradient for a unit upstream gradient."""
    local_vocab = logits.shape[-1]
    start = get_tensor_model_parallel_rank() * local_vocab
    full_vocab = local_vocab * get_tensor_model_parallel_world_size()
    vocab_size = full_vocab if vocab_size is None else vocab_size
    if not full_vocab - local_vocab < vocab_size <= full_vocab:
        raise ValueError(
            f"vocab_size {vocab_size} does not fit logits of {local_vocab} columns on each of "
            f"{get_tensor_model_parallel_world_size()} ranks (padded vocabulary {full_vocab})"
        )
    valid = target != ignore_index
    if host_checks.readable_without_sync(target):  # on a device: the trainer checked the host copy
        bad = valid & ((target < 0) | (target >= vocab_size))
        if bad.any():
            raise IndexError(f"targets must lie in [0, {vocab_size}) or equal ignore_index; "
                             f"got {target[bad][:8].tolist()}")

    # Padding columns (vocabulary not divisible by TP) take no part: the kernels stop before them.
    valid_columns = min(max(vocab_size - start, 0), local_vocab)
    valid = valid.reshape(-1)
    local_target = target.reshape(-1) - start
    on_this_rank = valid & (local_target >= 0) & (local_target < valid_columns)
    local_target = local_target.masked_fill(~on_this_rank, -1)

    partials = ops.cross_entropy_partials(logits, local_target, valid_columns)
    row_max = _all_reduce(partials[:, 0].contiguous(), dist.ReduceOp.MAX)
    # each rank's sum of exponentials taken to the global max; the target's logit (one rank's)
    sums = torch.stack([partials[:, 1] * (partials[:, 0] - row_max).exp(), partials[:, 2]])
    sum_exp, target_logit = _all_reduce(sums, dist.ReduceOp.SUM)
    loss = (row_max + sum_exp.log() - target_logit).masked_fill(~valid, 0.0)
    # ignored rows: scale 0 and no target, so their gradient is zero
    scale = torch.where(valid, sum_exp.reciprocal(), torch.zeros_like(sum_exp))
    ops.cross_entropy_grad_from_stats_(logits, local_target, valid_columns, row_max, scale)
    return loss.view(target.shape)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_local, target, vocab_size, ignore_index):
        grad = logits_local.reshape(-1, logits_local.shape[-1]).clone(memory_format=torch.contiguous_format)
        loss = _loss_and_unit_grad_(grad, target, vocab_size, ignore_index)
        ctx.save_for_backward(grad)
        ctx.logits_shape = logits_local.shape
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        grad.mul_(grad_loss.reshape(-1, 1).to(grad.dtype))  # in place: backward runs once
        return grad.view(ctx.logits_shape), None, None, None


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """``vocab_parallel_cross_entropy(column.local_output(hn), ...)`` as one Function: the logits
    are made in the buffer the backward keeps and become the loss's gradient there (no copy of
    them). The backward is the column layer's (the input gathered again under sequence
    parallelism, its gradient reduced), with the upstream gradient scaling the hidden-wide
    operands of its two GEMMs, as ``megallama.model``'s serial head does."""

    @staticmethod
    def forward(ctx, hn, weight, target, vocab_size, ignore_index, column):
        logits = F.linear(column.gather_input(hn), weight)
        unit_grad = logits.view(-1, logits.shape[-1])
        loss = _loss_and_unit_grad_(unit_grad, target, vocab_size, ignore_index)
        ctx.save_for_backward(hn, weight, unit_grad)
        ctx.column, ctx.lead_shape = column, logits.shape[:-1]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hn, weight, unit_grad = ctx.saved_tensors
        column = ctx.column
        scale = grad_loss.reshape(-1, 1).to(unit_grad.dtype)
        gather = column.start_input_gather(hn) if ctx.needs_input_grad[1] else None
        reduction = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.mm(unit_grad, weight).mul_(scale)
            reduction = column.start_input_grad_reduction(grad_input.view(*ctx.lead_shape, -1))
        grad_w = None
        if gather is not None:
            scaled_input = gather.wait().reshape(-1, weight.shape[1]) * scale
            grad_w = weight_grad(weight, unit_grad, scaled_input, column.fusable_wgrad)
        return (reduction.wait() if reduction is not None else None), grad_w, None, None, None, None


def vocab_parallel_linear_cross_entropy(hn, column, target, vocab_size=None, ignore_index=-100):
    """Per-token cross-entropy of the logits ``column.local_output(hn)`` (``column``: the output
    layer, a ``ColumnParallelLinear`` split along the vocabulary), the same as
    :func:`vocab_parallel_cross_entropy` of them, without keeping the logits beside their gradient."""
    return _VocabParallelLinearCrossEntropy.apply(hn, column.weight, target, vocab_size, ignore_index, column)


def vocab_parallel_cross_entropy(logits_local, target, vocab_size=None, ignore_index=-100):
    """Per-token cross-entropy (float32, float64 for float64 logits; shape of ``target``) of
    vocabulary-split logits.

    logits_local: [..., V_padded / TP], this rank's columns of the logits.
    target: [...] token ids in [0, vocab_size); positions equal to ``ignore_index`` get loss 0 and
        no gradient, as in ``F.cross_entropy``.
    vocab_size: the real vocabulary when it was padded to a multiple of TP; the padding columns
        are excluded from the softmax. Default: no padding.
    """
    return _VocabParallelCrossEntropy.apply(logits_local, target, vocab_size, ignore_index)
