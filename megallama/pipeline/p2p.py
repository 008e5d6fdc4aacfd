"""Point-to-point exchange of activations and their gradients between pipeline stages.

Every exchange is one ``batch_isend_irecv`` call, so a stage's sends and receives of one schedule
step are posted together (no ordering deadlock between neighbours that both send and receive).
``communicate`` waits for it before returning; ``post`` returns a :class:`PendingExchange` to wait
later, so that the transfer overlaps compute (the interleaved schedule's ``overlap_p2p_comm``). A
posted activation must stay unmodified until that wait. Ops are posted in a fixed order — the
forward direction (send to next, receive from previous) before the backward direction (send to
previous, receive from next) — and tagged by direction: NCCL matches a group's ops to one peer in
posting order and gloo matches by tag, so both stay correct when the next and the previous rank are
the same process (two stages, or the wrap-around of the interleaved schedule).

Receive buffers have the shape the schedule derives from the config (``[micro_batch, seq, hidden]``,
the sequence divided by TP under sequence parallelism): no shape handshake. Waits are bounded by
the timeout given to ``init_process_group``, so a wedged neighbour makes this stage raise.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megallama.distributed.timeout import default_group_timeout, wait

_FORWARD_TAG = 0
_BACKWARD_TAG = 1
_NCCL_GROUPS_READY = set()


@dataclass(frozen=True)
class ActivationShape:
    """What the stages exchange: ``[micro_batch_size, seq_length, hidden_size]`` in ``dtype``,
    with the sequence split over the tensor-parallel ranks under sequence parallelism."""

    seq_length: int
    micro_batch_size: int
    hidden_size: int
    dtype: torch.dtype = torch.float32
    sequence_parallel: bool = False

    def tensor_shape(self, tensor_parallel_size: int = 1) -> Tuple[int, int, int]:
        """The shape one TP rank sends: under sequence parallelism it holds its slice of the sequence."""
        seq_length = self.seq_length
        if self.sequence_parallel:
            if seq_length % tensor_parallel_size:
                raise ValueError(f"sequence parallelism needs seq_length ({seq_length}) divisible by "
                                 f"tensor_model_parallel_size ({tensor_parallel_size})")
            seq_length //= tensor_parallel_size
        return (self.micro_batch_size, seq_length, self.hidden_size)


class PendingExchange:
    """A posted exchange; ``wait()`` returns (from_prev, from_next) once every op completed."""

    def __init__(self, works, from_prev: Optional[torch.Tensor], from_next: Optional[torch.Tensor],
                 timeout):
        self._works = works
        self._received = (from_prev, from_next)
        self._timeout = timeout

    def wait(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        for work in self._works:
            wait(work, self._timeout)
        self._works = []
        return self._received


class PipelineCommunicator:
    """Exchanges tensors of one fixed shape with the neighbouring pipeline stages (a ring)."""

    def __init__(self, group: dist.ProcessGroup, tensor_shape: Sequence[int], dtype: torch.dtype,
                 device: torch.device):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next_rank = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev_rank = dist.get_global_rank(group, (self.rank - 1) % self.size)
        self.tensor_shape = tuple(tensor_shape)
        self.dtype = dtype
        self.device = device
        # A stage whose neighbour is wedged gives up after the job's process-group timeout.
        self.timeout = default_group_timeout()
        if dist.get_backend(group) == "nccl" and id(group) not in _NCCL_GROUPS_READY:
            # NCCL wants the first operation on a group to involve all of its ranks, and a
            # pipeline's first exchanges are between neighbours only: start with a barrier.
            dist.barrier(group=group)
            _NCCL_GROUPS_READY.add(id(group))

    def _buffer(self, requires_grad: bool) -> torch.Tensor:
        # A received activation is a leaf of this stage's autograd graph: its .grad is what the
        # stage sends back.
        return torch.empty(self.tensor_shape, dtype=self.dtype, device=self.device,
                           requires_grad=requires_grad)

    def _check(self, tensor: torch.Tensor, what: str) -> None:
        if tuple(tensor.shape) != self.tensor_shape or tensor.dtype != self.dtype:
            raise RuntimeError(
                f"pipeline stage {self.rank} would send {what} of shape {tuple(tensor.shape)} "
                f"{tensor.dtype}, but the stages exchange {self.tensor_shape} {self.dtype} "
                "(check seq_length, micro_batch_size, hidden_size, sequence_parallel and dtype)")

    def post(self, send_next: Optional[torch.Tensor] = None, send_prev: Optional[torch.Tensor] = None,
             recv_prev: bool = False, recv_next: bool = False) -> PendingExchange:
        """Post sends/receives in both directions at once, without waiting for them."""
        from_prev = self._buffer(requires_grad=True) if recv_prev else None
        from_next = self._buffer(requires_grad=False) if recv_next else None
        ops = []
        if send_next is not None:
            self._check(send_next, "an activation")
            ops.append(dist.P2POp(dist.isend, send_next.detach().contiguous(), self.next_rank,
                                  self.group, _FORWARD_TAG))
        if from_prev is not None:
            ops.append(dist.P2POp(dist.irecv, from_prev.data, self.prev_rank, self.group, _FORWARD_TAG))
        if send_prev is not None:
            self._check(send_prev, "an activation gradient")
            ops.append(dist.P2POp(dist.isend, send_prev.detach().contiguous(), self.prev_rank,
                                  self.group, _BACKWARD_TAG))
        if from_next is not None:
            ops.append(dist.P2POp(dist.irecv, from_next.data, self.next_rank, self.group, _BACKWARD_TAG))
        return PendingExchange(dist.batch_isend_irecv(ops) if ops else [], from_prev, from_next,
                               self.timeout)

    def communicate(self, send_next: Optional[torch.Tensor] = None,
                    send_prev: Optional[torch.Tensor] = None, recv_prev: bool = False,
                    recv_next: bool = False) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Send/receive in both directions at once and wait; returns (from_prev, from_next)."""
        return self.post(send_next, send_prev, recv_prev, recv_next).wait()

    def recv_forward(self) -> torch.Tensor:
        return self.communicate(recv_prev=True)[0]

    def send_forward(self, output: torch.Tensor) -> None:
        self.communicate(send_next=output)

    def recv_backward(self) -> torch.Tensor:
        return self.communicate(recv_next=True)[1]

    def send_backward(self, input_grad: torch.Tensor) -> None:
        self.communicate(send_prev=input_grad)

    def send_forward_recv_backward(self, output: torch.Tensor) -> torch.Tensor:
        return self.communicate(send_next=output, recv_next=True)[1]

    def send_backward_recv_forward(self, input_grad: torch.Tensor) -> torch.Tensor:
        return self.communicate(send_prev=input_grad, recv_prev=True)[0]
