"""Cross-entropy over logits split along the vocabulary, without ever gathering them.

Each rank holds logits[..., its vocabulary range]. Three all-reduces over the tensor-parallel group
give the global max (for stability), the target's logit (held by one rank, zeros elsewhere) and the
sum of exponentials: loss = log(sum exp(z - max)) - (z_target - max). The backward is local:
softmax minus the one-hot target, on this rank's columns.
"""
import torch
import torch.distributed as dist

from megallama import host_checks

from megallama.parallel.state import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)


def _all_reduce(x, op):
    if get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(x, op=op, group=get_tensor_model_parallel_group())
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_local, target, vocab_size, ignore_index):
        logits = logits_local.float()  # a copy when the logits are low precision; cloned below otherwise
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

        logits = logits.clone() if logits is logits_local else logits
        if start + local_vocab > vocab_size:
            # Padding columns (vocabulary not divisible by TP) must get no probability mass.
            logits[..., max(0, vocab_size - start):] = float("-inf")
        logits_max = _all_reduce(logits.amax(dim=-1), dist.ReduceOp.MAX)
        logits -= logits_max.unsqueeze(-1)

        local_target = target - start
        on_this_rank = valid & (local_target >= 0) & (local_target < local_vocab)
        local_target = local_target.masked_fill(~on_this_rank, 0)
        target_logit = logits.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = _all_reduce(target_logit.masked_fill(~on_this_rank, 0.0), dist.ReduceOp.SUM)

        exp_logits = logits.exp_()
        sum_exp = _all_reduce(exp_logits.sum(dim=-1), dist.ReduceOp.SUM)
        loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, on_this_rank, valid)
        ctx.input_dtype = logits_local.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, on_this_rank, valid = ctx.saved_tensors
        grad = softmax  # reused in place: backward runs once
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -on_this_rank.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_local, target, vocab_size=None, ignore_index=-100):
    """Per-token cross-entropy (float32, shape of ``target``) of vocabulary-split logits.

    logits_local: [..., V_padded / TP], this rank's columns of the logits.
    target: [...] token ids in [0, vocab_size); positions equal to ``ignore_index`` get loss 0 and
        no gradient, as in ``F.cross_entropy``.
    vocab_size: the real vocabulary when it was padded to a multiple of TP; the padding columns
        are excluded from the softmax. Default: no padding.
    """
    return _VocabParallelCrossEntropy.apply(logits_local, target, vocab_size, ignore_index)
