"""Forward/backward schedules over micro-batches: no pipelining, 1F1B and interleaved 1F1B.

The schedule API is independent of the training loop (Megatron's shape)::

    fwd_bwd = get_forward_backward_func(pipeline_size, virtual_size, overlap_p2p_comm=True)
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

**Overlapped exchanges.** With ``overlap_p2p_comm`` (Megatron's ``--overlap-p2p-communication``,
the default) the interleaved schedule posts each exchange right after the compute that produces
what it sends and waits for it right before the compute that needs what it receives: in the steady
state the forward-direction exchange overlaps the backward and the backward-direction one the next
forward. The ops and their order per peer are those of the synchronous schedule (in more, smaller
batches), so the results are bit-identical.

A stage's output is sent, then, once the send completed, its storage is freed (only its autograd
node is kept for backward), so a stage's last operation must not save its own output for backward
(LLaMA's residual add saves nothing).

Model chunks that have a ``no_sync()`` context (:class:`megallama.distributed.DistributedDataParallel`)
reduce their gradients only during the backward of their last micro-batch.
"""
import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.autograd import Variable

from megallama.pipeline.p2p import ActivationShape, PendingExchange, PipelineCommunicator

LossList = List[dict]


def get_forward_backward_func(pipeline_size: Optional[int] = None, virtual_size: Optional[int] = None,
                              overlap_p2p_comm: bool = True) -> Callable[..., LossList]:
    """The schedule for a pipeline of ``pipeline_size`` ranks with ``virtual_size`` chunks each.

    Sizes default to those of :mod:`megallama.parallel.state`; ``overlap_p2p_comm`` applies to the
    interleaved schedule only.
    """
    if pipeline_size is None:
        from megallama.parallel import state
        pipeline_size = state.get_pipeline_model_parallel_world_size()
        virtual_size = state.get_virtual_pipeline_model_parallel_world_size()
    if virtual_size is not None and virtual_size > 1:
        if pipeline_size < 2:
            raise ValueError(f"the interleaved schedule (virtual_size={virtual_size}) needs "
                             f"pipeline_model_parallel_size >= 2, got {pipeline_size}")
        return functools.partial(forward_backward_pipelining_with_interleaving,
                                 overlap_p2p_comm=overlap_p2p_comm)
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
        shape: ActivationShape, forward_only=False, overlap_p2p_comm: bool = True) -> LossList:
    """Interleaved 1F1B (Narayanan et al. 2021) over ``v`` model chunks per rank.

    Micro-batches go through the chunks in groups of ``p``; ``data_iterator`` is a list with one
    iterator per chunk. The number of micro-batches must be a multiple of the pipeline size.
    ``overlap_p2p_comm`` overlaps the exchanges with compute; without it each step ends with one
    synchronous exchange in both directions.
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
                                    comm, forward_only, overlap_p2p_comm)
    return schedule.run()


@dataclass
class _Exchange:
    """One exchange of a schedule step: what it sends, and for which chunk each received tensor is."""

    send_next: Optional[torch.Tensor] = None
    input_chunk: Optional[int] = None  # the chunk whose input arrives from the previous rank
    send_prev: Optional[torch.Tensor] = None
    grad_chunk: Optional[int] = None  # the chunk whose output gradient arrives from the next rank


class _InterleavedSchedule:
    """One interleaved 1F1B pass on this rank: ``p`` ranks, ``v`` chunks each, ``M`` micro-batches.

    Each direction numbers its steps ``k = 0 .. M·v − 1``. Forward step ``k`` runs chunk
    ``chunk_of(k, True)`` on micro-batch ``microbatch_of(k)``; backward step ``k`` runs the chunks in
    reverse order. Per chunk, the queues hold the inputs received (or ``None`` on the first chunk),
    the outputs kept for backward and the output gradients received, oldest first.

    A step states its exchange in two parts (forward direction after its forward, backward direction
    after its backward). With ``overlap`` each part is posted at once and waited for right before
    the next compute that needs its direction's tensors; without it the step ends with both parts
    posted as one exchange and waited for.
    """

    def __init__(self, forward_step_func, data_iterators, model_chunks, num_microbatches,
                 comm: PipelineCommunicator, forward_only: bool, overlap: bool):
        self.forward_step_func = forward_step_func
        self.data_iterators = data_iterators
        self.model_chunks = model_chunks
        self.comm = comm
        self.forward_only = forward_only
        self.overlap = overlap
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
        self.step = _Exchange()  # this step's exchange, not posted yet
        # Posted, not yet waited: under overlap at most one per direction ("forward", "backward").
        self.pending: Dict[str, Tuple[PendingExchange, _Exchange]] = {}

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

    # --- exchanges ---------------------------------------------------------------------------------

    def exchange_forward(self, output: Optional[torch.Tensor], input_chunk: Optional[int]) -> None:
        """The step's forward direction: ``output`` to the next rank, an input for ``input_chunk``."""
        self.step.send_next, self.step.input_chunk = output, input_chunk
        if self.overlap:
            self.post("forward")

    def exchange_backward(self, input_grad: Optional[torch.Tensor], grad_chunk: Optional[int]) -> None:
        """The step's backward direction: ``input_grad`` to the previous rank, an output gradient
        for ``grad_chunk``."""
        self.step.send_prev, self.step.grad_chunk = input_grad, grad_chunk
        if self.overlap:
            self.post("backward")

    def end_step(self) -> None:
        """Without overlap, the step's one exchange: both directions posted together and waited."""
        if not self.overlap:
            self.post("both")
            self.complete("both")

    def post(self, direction: str) -> None:
        """Post the step's exchange stated so far, to be completed under ``direction``."""
        step, self.step = self.step, _Exchange()
        if (step.send_next is None and step.send_prev is None and step.input_chunk is None
                and step.grad_chunk is None):
            return  # nothing to exchange
        assert direction not in self.pending, f"a {direction} exchange is already in flight"
        handle = self.comm.post(send_next=step.send_next, send_prev=step.send_prev,
                                recv_prev=step.input_chunk is not None,
                                recv_next=step.grad_chunk is not None)
        self.pending[direction] = (handle, step)

    def complete(self, direction: str) -> None:
        """Wait for the exchange in flight in ``direction`` (if any), queue what it brought and free
        the activation it sent (only now: the send reads that storage until it completes)."""
        if direction not in self.pending:
            return
        handle, step = self.pending.pop(direction)
        input_tensor, output_grad = handle.wait()
        if step.input_chunk is not None:
            self.inputs[step.input_chunk].append(input_tensor)
        if step.grad_chunk is not None:
            self.output_grads[step.grad_chunk].append(output_grad)
        _free_output(step.send_next)

    def recv_chunk(self, k: int, forward: bool, last: bool) -> Optional[int]:
        """The chunk of the tensor that arrives after step ``k`` (None if none, or ``last`` step)."""
        recv, chunk = self.next_recv(k, forward)
        return chunk if recv and not last else None

    # --- phases ------------------------------------------------------------------------------------

    def run(self) -> LossList:
        self.warmup()
        self.steady()
        self.complete("forward")  # the last activation sent
        if not self.forward_only:
            self.cooldown()
        return self.losses

    def warmup(self) -> None:
        """Forwards only; the last exchange also brings the first backward's gradient."""
        if self.r != 0:
            self.exchange_forward(None, 0)
            self.end_step()
        for k in range(self.num_warmup):
            self.complete("forward")
            to_send = self.forward(k)
            self.exchange_forward(to_send, self.recv_chunk(k, True, last=k == self.total - 1))
            if (k == self.num_warmup - 1 and not self.forward_only and not self.all_warmup
                    and self.r != self.p - 1):
                self.exchange_backward(None, self.v - 1)
            self.end_step()

    def steady(self) -> None:
        """One forward and one backward per step."""
        for i in range(self.num_steady):
            forward_k = self.num_warmup + i
            self.complete("forward")
            to_send = self.forward(forward_k)
            self.exchange_forward(to_send, self.recv_chunk(forward_k, True, last=i == self.num_steady - 1))
            self.complete("backward")
            grad_to_send = self.backward(i)
            self.exchange_backward(grad_to_send, self.recv_chunk(i, False, last=False))
            self.end_step()

    def cooldown(self) -> None:
        """The backwards left after the last forward."""
        if self.all_warmup and self.r != self.p - 1:
            self.exchange_backward(None, self.v - 1)
            self.end_step()
        for k in range(self.num_steady, self.total):
            self.complete("backward")
            grad_to_send = self.backward(k)
            self.exchange_backward(grad_to_send, self.recv_chunk(k, False, last=k == self.total - 1))
            self.end_step()
        self.complete("backward")  # the last gradient sent
