"""Forward/backward schedules over micro-batches: no pipelining, 1F1B and interleaved 1F1B.

The schedule API is independent of the training loop (Megatron's shape)::

    fwd_bwd = get_forward_backward_func(pipeline_size, virtual_size)
    shape = ActivationShape(seq_length, micro_batch_size, hidden_size, dtype, sequence_parallel)
    losses = fwd_bwd(forward_step_func, data_iterator, model_chunks, num_microbatches, shape,
                     forward_only=False)

``forward_step_func(data_iterator, model_chunk, input_tensor) -> (output_tensor, loss_func)``
runs one micro-batch through one model chunk; ``input_tensor`` is ``None`` on the first stage
(which reads ``input_ids`` from the iterator) and the activation received from the previous stage
elsewhere; ``shape`` (:class:`~megallama.pipeline.p2p.ActivationShape`) is that activation's.
On the last stage ``loss_func(output_tensor) -> (loss_sum, num_tokens)`` gives the SUM
of the micro-batch's per-token losses and the number of tokens counted.

**Loss reduction.** Backward runs on ``loss_sum``, so after the schedule the gradients are those of
the summed token losses; :func:`megallama.distributed.finalize_model_grads` then sums them over data
parallelism and divides by the global batch's token count, giving exactly the gradient of the mean
token loss over the global batch, whatever the split into micro-batches, stages and DP ranks. The
returned list holds, on the last pipeline stage, ``{"loss_sum", "num_tokens"}`` per micro-batch (an
empty list on the other stages).

A stage's output is sent, then its storage is freed (only its autograd node is kept for backward),
so a stage's last operation must not save its own output for backward (LLaMA's residual add
saves nothing).

Model chunks that have a ``no_sync()`` context (:class:`megallama.distributed.DistributedDataParallel`)
reduce their gradients only during the backward of their last micro-batch.
"""
import contextlib
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.autograd import Variable

from megallama.pipeline.p2p import ActivationShape, PipelineCommunicator

LossList = List[dict]


def get_forward_backward_func(pipeline_size: Optional[int] = None,
                              virtual_size: Optional[int] = None) -> Callable[..., LossList]:
    """The schedule for a pipeline of ``pipeline_size`` ranks with ``virtual_size`` chunks each.

    Sizes default to those of :mod:`megallama.parallel.state`.
    """
    if pipeline_size is None:
        from megallama.parallel import state
        pipeline_size = state.get_pipeline_model_parallel_world_size()
        virtual_size = state.get_virtual_pipeline_model_parallel_world_size()
    if virtual_size is not None and virtual_size > 1:
        if pipeline_size < 2:
            raise ValueError(f"the interleaved schedule (virtual_size={virtual_size}) needs "
                             f"pipeline_model_parallel_size >= 2, got {pipeline_size}")
        return forward_backward_pipelining_with_interleaving
    if pipeline_size > 1:
        return forward_backward_pipelining_without_interleaving
    return forward_backward_no_pipelining


# --- helpers shared by the schedules ------------------------------------------------------------

def _grad_sync(chunk: torch.nn.Module, enabled: bool):
    no_sync = getattr(chunk, "no_sync", None)
    return contextlib.nullcontext() if enabled or no_sync is None else no_sync()


def _forward(forward_step_func, data_iterator, chunk, input_tensor, is_last_stage, losses):
    output, loss_func = forward_step_func(data_iterator, chunk, input_tensor)
    if not is_last_stage:
        return output
    loss_sum, num_tokens = loss_func(output)
    if loss_sum.dim() != 0:
        raise RuntimeError(f"loss_func must return the scalar sum of token losses, got shape "
                           f"{tuple(loss_sum.shape)}")
    losses.append({"loss_sum": loss_sum.detach(), "num_tokens": num_tokens})
    return loss_sum


def _free_output(output: Optional[torch.Tensor]) -> None:
    """Drop a sent activation's storage; its autograd node (all backward needs) is kept."""
    if output is not None:
        output.data = torch.empty((1,), dtype=output.dtype, device=output.device)


def _backward(chunk, input_tensor, output, output_grad, sync: bool) -> Optional[torch.Tensor]:
    with _grad_sync(chunk, sync):
        if output_grad is None:
            torch.autograd.backward(output)
        else:
            # The output's storage was freed after sending, so torch.autograd.backward's shape
            # check would fail; the engine only needs the graph.
            Variable._execution_engine.run_backward(
                tensors=(output,), grad_tensors=(output_grad,), keep_graph=False,
                create_graph=False, inputs=(), allow_unreachable=True, accumulate_grad=True)
    return None if input_tensor is None else input_tensor.grad


def _check_common(model_chunks, num_microbatches, expected_chunks):
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if len(model_chunks) != expected_chunks:
        raise ValueError(f"this schedule runs {expected_chunks} model chunk(s) per rank, got "
                         f"{len(model_chunks)}")


def _communicator(model_chunks, shape: ActivationShape) -> PipelineCommunicator:
    from megallama.parallel import state
    device = next(model_chunks[0].parameters()).device
    return PipelineCommunicator(state.get_pipeline_model_parallel_group(),
                                shape.tensor_shape(state.get_tensor_model_parallel_world_size()),
                                shape.dtype, device)


def _grad_context(forward_only):
    return torch.no_grad() if forward_only else contextlib.nullcontext()


# --- no pipelining ------------------------------------------------------------------------------

def forward_backward_no_pipelining(forward_step_func, data_iterator, model_chunks, num_microbatches,
                                   shape: ActivationShape, forward_only=False) -> LossList:
    """Gradient accumulation over micro-batches on a single stage (nothing is exchanged: ``shape``
    is taken so that every schedule is called alike)."""
    model_chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    _check_common(model_chunks, num_microbatches, 1)
    chunk = model_chunks[0]
    losses: LossList = []
    for mb in range(num_microbatches):
        with _grad_context(forward_only):
            loss = _forward(forward_step_func, data_iterator, chunk, None, True, losses)
        if not forward_only:
            _backward(chunk, None, loss, None, sync=mb == num_microbatches - 1)
    return losses


# --- 1F1B ---------------------------------------------------------------------------------------

def forward_backward_pipelining_without_interleaving(
        forward_step_func, data_iterator, model_chunks, num_microbatches, shape: ActivationShape,
        forward_only=False) -> LossList:
    """1F1B: ``p − r − 1`` warm-up forwards on rank ``r``, then one forward / one backward."""
    model_chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    _check_common(model_chunks, num_microbatches, 1)
    chunk = model_chunks[0]
    comm = _communicator(model_chunks, shape)
    p, r = comm.size, comm.rank
    first, last = r == 0, r == p - 1
    num_warmup = num_microbatches if forward_only else min(p - r - 1, num_microbatches)
    num_steady = num_microbatches - num_warmup  # 0 when forward_only
    losses: LossList = []
    inputs: List[Optional[torch.Tensor]] = []
    outputs: List[torch.Tensor] = []
    backward_done = 0

    def forward(input_tensor):
        with _grad_context(forward_only):
            return _forward(forward_step_func, data_iterator, chunk, input_tensor, last, losses)

    def backward(output_grad):
        nonlocal backward_done
        backward_done += 1
        return _backward(chunk, inputs.pop(0), outputs.pop(0), output_grad,
                         sync=backward_done == num_microbatches)

    for _ in range(num_warmup):
        input_tensor = None if first else comm.recv_forward()
        output = forward(input_tensor)
        if not last:
            comm.send_forward(output)
        if not forward_only:
            inputs.append(input_tensor)
            outputs.append(output)
        _free_output(None if last else output)

    input_tensor = None if first or num_steady == 0 else comm.recv_forward()
    for i in range(num_steady):
        last_iteration = i == num_steady - 1
        output = forward(input_tensor)
        output_grad = None if last else comm.send_forward_recv_backward(output)
        inputs.append(input_tensor)
        outputs.append(output)
        _free_output(None if last else output)
        input_grad = backward(output_grad)
        if last_iteration:
            input_tensor = None
            if not first:
                comm.send_backward(input_grad)
        else:
            input_tensor = None if first else comm.send_backward_recv_forward(input_grad)

    if not forward_only:
        for _ in range(num_warmup):
            output_grad = None if last else comm.recv_backward()
            input_grad = backward(output_grad)
            if not first:
                comm.send_backward(input_grad)
    return losses


# --- interleaved 1F1B ---------------------------------------------------------------------------

def forward_backward_pipelining_with_interleaving(
        forward_step_func, data_iterator: Sequence[Iterator], model_chunks, num_microbatches,
        shape: ActivationShape, forward_only=False) -> LossList:
    """Interleaved 1F1B (Narayanan et al. 2021) over ``v`` model chunks per rank.

    Micro-batches go through the chunks in groups of ``p``; ``data_iterator`` is a list with one
    iterator per chunk. The number of micro-batches must be a multiple of the pipeline size.
    """
    from megallama.parallel import state

    model_chunks = list(model_chunks)
    # The chunk count set up with the process groups, if any, is what the ranks agreed on.
    v = state.get_virtual_pipeline_model_parallel_world_size() or len(model_chunks)
    comm = _communicator(model_chunks, shape)
    _check_common(model_chunks, num_microbatches, v)
    if v < 2:
        raise ValueError("the interleaved schedule needs >= 2 model chunks per rank; use "
                         "forward_backward_pipelining_without_interleaving for one")
    if num_microbatches % comm.size:
        raise ValueError(f"the interleaved schedule needs the number of micro-batches "
                         f"({num_microbatches}) divisible by pipeline_model_parallel_size ({comm.size})")
    if not isinstance(data_iterator, (list, tuple)) or len(data_iterator) != v:
        raise ValueError(f"the interleaved schedule needs a list of {v} data iterators (one per "
                         "model chunk)")
    schedule = _InterleavedSchedule(forward_step_func, data_iterator, model_chunks, num_microbatches,
                                    comm, forward_only)
    return schedule.run()


class _InterleavedSchedule:
    """One interleaved 1F1B pass on this rank: ``p`` ranks, ``v`` chunks each, ``M`` micro-batches.

    Each direction numbers its steps ``k = 0 .. M·v − 1``. Forward step ``k`` runs chunk
    ``chunk_of(k, True)`` on micro-batch ``microbatch_of(k)``; backward step ``k`` runs the chunks in
    reverse order. Per chunk, the queues hold the inputs received (or ``None`` on the first chunk),
    the outputs kept for backward and the output gradients received, oldest first.
    """

    def __init__(self, forward_step_func, data_iterators, model_chunks, num_microbatches,
                 comm: PipelineCommunicator, forward_only: bool):
        self.forward_step_func = forward_step_func
        self.data_iterators = data_iterators
        self.model_chunks = model_chunks
        self.comm = comm
        self.forward_only = forward_only
        self.p, self.r, self.v = comm.size, comm.rank, len(model_chunks)
        self.num_microbatches = num_microbatches
        self.total = num_microbatches * self.v
        # With one group of micro-batches the first backward needs every forward done.
        self.all_warmup = num_microbatches == self.p
        if forward_only or self.all_warmup:
            self.num_warmup = self.total
        else:
            self.num_warmup = min((self.p - self.r - 1) * 2 + (self.v - 1) * self.p, self.total)
        self.num_steady = self.total - self.num_warmup
        self.losses: LossList = []
        self.inputs: List[List[Optional[torch.Tensor]]] = [[] for _ in range(self.v)]
        self.outputs: List[List[torch.Tensor]] = [[] for _ in range(self.v)]
        self.output_grads: List[List[torch.Tensor]] = [[] for _ in range(self.v)]

    # --- chunk and micro-batch arithmetic --------------------------------------------------------

    def chunk_of(self, k: int, forward: bool) -> int:
        c = (k % (self.p * self.v)) // self.p
        return c if forward else self.v - 1 - c

    def microbatch_of(self, k: int) -> int:
        return (k // (self.p * self.v)) * self.p + k % self.p

    def is_first(self, c: int) -> bool:
        return self.r == 0 and c == 0

    def is_last(self, c: int) -> bool:
        return self.r == self.p - 1 and c == self.v - 1

    def next_recv(self, k: int, forward: bool) -> Tuple[bool, Optional[int]]:
        """Whether a tensor arrives after step ``k`` and which chunk it is for.

        The leading rank (first in forward, last in backward) runs ``p − 1`` steps ahead of the rank
        that feeds it round the ring, so what it receives was produced ``p − 1`` steps earlier.
        """
        p, v = self.p, self.v
        if self.r != (0 if forward else p - 1):
            return True, self.chunk_of(k + 1, forward)
        if k < p - 1:
            return False, None
        sender_chunk = self.chunk_of(k - (p - 1), forward)
        if sender_chunk == (v - 1 if forward else 0):
            return False, None
        return True, sender_chunk + (1 if forward else -1)

    # --- one step ----------------------------------------------------------------------------------

    def forward(self, k: int) -> Optional[torch.Tensor]:
        """Forward of step k; returns what to send to the next rank (None on the last chunk)."""
        c = self.chunk_of(k, True)
        if self.is_first(c):
            self.inputs[c].append(None)
        # Backward pops the input later; forward-only has no backward to keep it for.
        input_tensor = self.inputs[c].pop(0) if self.forward_only else self.inputs[c][-1]
        with _grad_context(self.forward_only):
            output = _forward(self.forward_step_func, self.data_iterators[c], self.model_chunks[c],
                              input_tensor, self.is_last(c), self.losses)
        if not self.forward_only:
            self.outputs[c].append(output)
        return None if self.is_last(c) else output

    def backward(self, k: int) -> Optional[torch.Tensor]:
        """Backward of step k; returns what to send to the previous rank (None on the first chunk)."""
        c = self.chunk_of(k, False)
        output_grad = None if self.is_last(c) else self.output_grads[c].pop(0)
        input_grad = _backward(self.model_chunks[c], self.inputs[c].pop(0), self.outputs[c].pop(0),
                               output_grad, sync=self.microbatch_of(k) == self.num_microbatches - 1)
        return None if self.is_first(c) else input_grad

    # --- phases ------------------------------------------------------------------------------------

    def run(self) -> LossList:
        self.warmup()
        self.steady()
        if not self.forward_only:
            self.cooldown()
        return self.losses

    def warmup(self) -> None:
        """Forwards only; the last exchange also brings the first backward's gradient."""
        comm = self.comm
        if self.r != 0:
            self.inputs[0].append(comm.recv_forward())
        for k in range(self.num_warmup):
            to_send = self.forward(k)
            recv_prev, recv_chunk = self.next_recv(k, True)
            if k == self.total - 1:
                recv_prev = False
            if k == self.num_warmup - 1 and not self.forward_only and not self.all_warmup:
                input_tensor, output_grad = comm.communicate(send_next=to_send, recv_prev=recv_prev,
                                                             recv_next=self.r != self.p - 1)
                if output_grad is not None:
                    self.output_grads[self.v - 1].append(output_grad)
            else:
                input_tensor, _ = comm.communicate(send_next=to_send, recv_prev=recv_prev)
            if recv_prev:
                self.inputs[recv_chunk].append(input_tensor)
            _free_output(to_send)

    def steady(self) -> None:
        """One forward and one backward per step, both directions exchanged at once."""
        for i in range(self.num_steady):
            forward_k = self.num_warmup + i
            to_send = self.forward(forward_k)
            grad_to_send = self.backward(i)
            recv_prev, recv_chunk = self.next_recv(forward_k, True)
            recv_next, grad_chunk = self.next_recv(i, False)
            if i == self.num_steady - 1:
                recv_prev = False
            input_tensor, output_grad = self.comm.communicate(
                send_next=to_send, send_prev=grad_to_send, recv_prev=recv_prev, recv_next=recv_next)
            _free_output(to_send)
            if recv_prev:
                self.inputs[recv_chunk].append(input_tensor)
            if recv_next:
                self.output_grads[grad_chunk].append(output_grad)

    def cooldown(self) -> None:
        """The backwards left after the last forward."""
        if self.all_warmup and self.r != self.p - 1:
            self.output_grads[self.v - 1].append(self.comm.recv_backward())
        for k in range(self.num_steady, self.total):
            grad_to_send = self.backward(k)
            recv_next, grad_chunk = self.next_recv(k, False)
            if k == self.total - 1:
                recv_next = False
            _, output_grad = self.comm.communicate(send_prev=grad_to_send, recv_next=recv_next)
            if recv_next:
                self.output_grads[grad_chunk].append(output_grad)
