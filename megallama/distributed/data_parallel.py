"""Data parallelism: gradients reduced over the DP group in buckets, overlapping the backward pass.

:class:`DistributedDataParallel` gives every parameter a ``main_grad``: a view into one contiguous
fp32 buffer (whatever the parameter's dtype, so bf16 training accumulates gradients in fp32).
Autograd's per-parameter gradient is added into ``main_grad`` as soon as it is produced (or, with
``gradient_accumulation_fusion``, the layers' hand-written backwards multiply straight into it:
:func:`megallama.parallel.layers.weight_grad`); when every
parameter of a bucket has its gradient for the last micro-batch, the bucket's collective starts
asynchronously while backward continues on the earlier layers. Buckets are filled in reverse
parameter order, the order backward produces gradients.

Without the distributed optimizer a bucket is all-reduced (summed); with it, reduce-scattered: DP
rank ``i`` receives the summed gradient of the ``i``-th equal slice of each bucket, the slice whose
fp32 main parameters and AdamW state it owns (ZeRO-1). Buckets are padded to a multiple of the DP
size so the slices are equal.

With the distributed optimizer a bucket's parameters are views of one buffer, and the new
parameters come back by an in-place all-gather of its slices into it
(:meth:`DistributedDataParallel.start_param_gather`). With ``overlap_param_gather`` those
all-gathers are left in flight after the optimizer step and each is waited for in the forward
pre-hook of the first module that reads its parameters, so they hide behind the next forward
(Megatron's ``--overlap-param-gather``); :meth:`~DistributedDataParallel.finish_param_sync` waits
for all of them, for whatever reads the parameters outside a forward (checkpoint saves).
"""
import contextlib
import functools
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megallama.distributed.timeout import default_group_timeout, wait

DEFAULT_BUCKET_SIZE = 40_000_000  # elements; Megatron's default order of magnitude

# torch 2.13 renamed the tensor-in/tensor-out collectives; older releases have only the old names.
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Bucket:
    def __init__(self, params: List[torch.nn.Parameter], start: int, numel: int, padded: int):
        self.params = params
        self.start = start          # offset in the grad buffer
        self.numel = numel          # elements of its parameters
        self.padded = padded        # numel rounded up to a multiple of the DP size
        self.pending = len(params)
        self.work = None
        self.send_buffer = None
        self.param_data = None    # with the distributed optimizer: the parameters' storage, padded
        self.param_gather = None  # the all-gather of new parameters into param_data, in flight


class DistributedDataParallel(torch.nn.Module):
    """Wraps one model chunk; ``forward`` is the wrapped module's.

    Args:
        module: the model chunk.
        data_parallel_group: the DP process group (default: that of ``megallama.parallel.state``).
        use_distributed_optimizer: reduce-scatter buckets instead of all-reducing them.
        bucket_size: elements per bucket (a bucket closes once it holds at least this many).
        overlap_grad_reduce: start each bucket's collective as soon as it is ready; otherwise all
            collectives run in :meth:`finish_grad_sync`.
        overlap_param_gather: leave the optimizer's parameter all-gathers in flight until the
            forward needs their parameters (needs ``use_distributed_optimizer``); otherwise each
            is waited for in the optimizer step.
        gradient_accumulation_fusion: let the weight-gradient products of megallama's linear layers
            accumulate into ``main_grad`` themselves (fp32 output of the GEMM on CUDA) instead of
            producing a gradient in the parameter's dtype that a hook then adds: Megatron's
            ``--gradient-accumulation-fusion``. Each parameter gets ``signal_main_grad_added``,
            which such a backward calls in place of returning the gradient.
    """

    def __init__(self, module: torch.nn.Module, data_parallel_group: Optional[dist.ProcessGroup] = None,
                 use_distributed_optimizer: bool = False, bucket_size: int = DEFAULT_BUCKET_SIZE,
                 overlap_grad_reduce: bool = True, overlap_param_gather: bool = False,
                 gradient_accumulation_fusion: bool = False):
        super().__init__()
        if data_parallel_group is None:
            from megallama.parallel import state
            data_parallel_group = state.get_data_parallel_group()
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1 element, got {bucket_size}")
        if overlap_param_gather and not use_distributed_optimizer:
            raise ValueError("overlap_param_gather needs the distributed optimizer "
                             "(use_distributed_optimizer=True): only it all-gathers parameters")
        self.module = module
        self.data_parallel_group = data_parallel_group
        self.dp_size = dist.get_world_size(data_parallel_group)
        self.dp_rank = dist.get_rank(data_parallel_group)
        self.use_distributed_optimizer = use_distributed_optimizer
        self.overlap_grad_reduce = overlap_grad_reduce
        self.overlap_param_gather = overlap_param_gather
        self._sync_enabled = True
        self._timeout = default_group_timeout()
        self._reduces_scatter_in_place = dist.get_backend(data_parallel_group) == "nccl"

        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("DistributedDataParallel: the module has no trainable parameters")
        device = params[0].device
        self.buckets: List[_Bucket] = []
        self.param_range: Dict[torch.nn.Parameter, Tuple[int, int]] = {}  # buffer [start, end)
        self._bucket_of: Dict[torch.nn.Parameter, _Bucket] = {}
        shared = [p for p in params if getattr(p, "shared", False)]
        offset, current, current_numel = 0, [], 0
        for p in reversed(params):
            if getattr(p, "shared", False):
                continue
            current.append(p)
            current_numel += p.numel()
            if current_numel >= bucket_size:
                offset = self._close_bucket(current, offset, current_numel)
                current, current_numel = [], 0
        if current:
            offset = self._close_bucket(current, offset, current_numel)
        # Shared parameters (a tied embedding on the first and last pipeline stage) get a bucket of
        # their own, reduced over DP only in finish_grad_sync, once the two stages have summed them.
        self._shared_bucket: Optional[_Bucket] = None
        if shared:
            offset = self._close_bucket(shared, offset, sum(p.numel() for p in shared))
            self._shared_bucket = self.buckets[-1]
        self.grad_buffer = torch.zeros(offset, dtype=torch.float32, device=device)
        for bucket in self.buckets:
            pos = bucket.start
            for p in bucket.params:
                self.param_range[p] = (pos, pos + p.numel())
                self._bucket_of[p] = bucket
                p.main_grad = self.grad_buffer[pos:pos + p.numel()].view(p.shape)
                p.register_post_accumulate_grad_hook(self._grad_ready)
                if gradient_accumulation_fusion:
                    p.signal_main_grad_added = functools.partial(self._main_grad_ready, p)
                pos += p.numel()
            if use_distributed_optimizer:
                self._share_param_storage(bucket)
        # The order the forward needs the buckets in: the order their all-gathers are started.
        self.param_gather_order: List[_Bucket] = list(reversed(self.buckets))
        if overlap_param_gather:
            self._register_param_gather_hooks()

    def _close_bucket(self, params, offset: int, numel: int) -> int:
        padded = -(-numel // self.dp_size) * self.dp_size
        self.buckets.append(_Bucket(params, offset, numel, padded))
        return offset + padded

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # --- parameter all-gather (distributed optimizer) --------------------------------------------

    def _register_param_gather_hooks(self) -> None:
        """A forward pre-hook on every module waits for the buckets of the parameters it may read.

        megallama's modules read their children's weights directly (the fused attention and MLP,
        the loss on ``output.weight``), so a submodule waits for its whole subtree. The wrapped
        module's own leaf children are waited for where the forward reaches them, in the order the
        children are registered (the order they run): those before its first child with children
        of its own (the embedding) in its pre-hook, those after its last (final norm, output layer)
        in the pre-hook of the first of them, which runs right before the head reads the output
        weight. So every layer's gather, and the output layer's, stays in flight until needed.
        """
        top = self.module
        children = list(top.children())
        nested = [i for i, c in enumerate(children) if next(c.children(), None) is not None]
        leading = children[:nested[0]] if nested else children
        trailing = children[nested[-1] + 1:] if nested else []
        # (module, the parameters its pre-hook waits for), in the order the forward reaches them
        hooks = [(top, [*top.parameters(recurse=False), *(p for c in leading for p in c.parameters())])]
        hooks += [(m, list(m.parameters())) for m in top.modules() if m is not top]
        if trailing:
            hooks.append((trailing[0], [p for c in trailing for p in c.parameters()]))
        order: List[_Bucket] = []
        waited: Dict[torch.nn.Module, List[_Bucket]] = {}
        for module, params in hooks:
            buckets = waited.setdefault(module, [])
            for p in params:
                bucket = self._bucket_of.get(p)
                if bucket is not None and all(bucket is not b for b in buckets):
                    buckets.append(bucket)
            order += [b for b in buckets if all(b is not o for o in order)]
        for module, buckets in waited.items():
            if buckets:
                module.register_forward_pre_hook(self._param_gather_hook(buckets))
        self.param_gather_order = order + [b for b in self.param_gather_order if all(b is not o for o in order)]

    def _param_gather_hook(self, buckets: List[_Bucket]):
        def hook(module, args):
            for bucket in buckets:
                self.wait_param_gather(bucket)
        return hook

    def _share_param_storage(self, bucket: _Bucket) -> None:
        """Make ``bucket``'s parameters views of one padded buffer, which the parameter all-gather
        then fills in place: nothing is copied after it, parameter by parameter (Megatron's param
        buffer)."""
        dtypes = {p.dtype for p in bucket.params}
        if len(dtypes) > 1:
            raise ValueError(f"a gradient bucket mixes parameter dtypes {dtypes}; the "
                             "distributed optimizer all-gathers a bucket in one dtype")
        bucket.param_data = torch.zeros(bucket.padded, dtype=bucket.params[0].dtype, device=bucket.params[0].device)
        with torch.no_grad():
            for p in bucket.params:
                lo, hi = self.param_range[p]
                view = bucket.param_data[lo - bucket.start:hi - bucket.start].view(p.shape)
                view.copy_(p)
                p.data = view

    def start_param_gather(self, bucket: _Bucket) -> None:
        """All-gather ``bucket``'s parameters from every DP rank's slice of it (its
        :meth:`shard_range`, which the optimizer has just written) into the parameters themselves
        and, unless ``overlap_param_gather``, wait."""
        if self.dp_size == 1:
            return
        start, end = self.shard_range(bucket)
        # In place: each rank's input is its own slice of the output, as NCCL documents and as
        # gloo gathers correctly (tests/distributed/test_overlap.py compares to a serial run).
        work = all_gather_single(bucket.param_data, bucket.param_data[start - bucket.start:end - bucket.start],
                                 group=self.data_parallel_group, async_op=self.overlap_param_gather)
        bucket.param_gather = work
        if not self.overlap_param_gather:
            self.wait_param_gather(bucket)

    def wait_param_gather(self, bucket: _Bucket) -> None:
        """Wait for ``bucket``'s parameter all-gather, if one is in flight."""
        if bucket.param_gather is None:
            return
        work, bucket.param_gather = bucket.param_gather, None
        wait(work, self._timeout)

    def finish_param_sync(self) -> None:
        """Complete every parameter all-gather in flight: call before reading the parameters
        outside a forward (saving a checkpoint, comparing or exporting weights)."""
        for bucket in self.param_gather_order:
            self.wait_param_gather(bucket)

    # --- gradient flow ----------------------------------------------------------------------------

    def _grad_ready(self, param: torch.nn.Parameter) -> None:
        if param.grad is None:  # a fused backward added it and signalled (autograd still runs this hook)
            return
        param.main_grad.add_(param.grad)
        param.grad = None
        self._main_grad_ready(param)

    def _main_grad_ready(self, param: torch.nn.Parameter) -> None:
        """``param``'s gradient of this micro-batch is in its ``main_grad``."""
        if not self._sync_enabled:
            return
        bucket = self._bucket_of[param]
        bucket.pending -= 1
        if bucket.pending < 0:  # its bucket may have been reduced before its last gradient came
            raise RuntimeError("DistributedDataParallel: a parameter's gradient was reported twice in one backward "
                               "(a weight used twice must not add into main_grad itself: weight_grad(fusable=False))")
        if bucket.pending == 0 and self.overlap_grad_reduce and bucket is not self._shared_bucket:
            self._start_reduce(bucket)

    def bucket_view(self, bucket: _Bucket) -> torch.Tensor:
        return self.grad_buffer[bucket.start:bucket.start + bucket.padded]

    def shard_range(self, bucket: _Bucket) -> Tuple[int, int]:
        """The buffer range [start, end) of ``bucket`` whose reduced gradient this DP rank owns."""
        shard = bucket.padded // self.dp_size
        start = bucket.start + self.dp_rank * shard
        return start, start + shard

    def _start_reduce(self, bucket: _Bucket) -> None:
        if bucket.work is not None:
            raise RuntimeError("DistributedDataParallel: a bucket was reduced twice in one step "
                               "(a parameter got two gradients; call zero_grad_buffer() per step)")
        view = self.bucket_view(bucket)
        if self.dp_size == 1:
            bucket.work = _DoneWork()
        elif self.use_distributed_optimizer:
            start, end = self.shard_range(bucket)
            # The output slice lies inside the input. NCCL reduces in place when the output is the
            # rank's offset of the input (its documented in-place form); gloo gives wrong sums then
            # (measured), so elsewhere the input is copied and the copy lives on the bucket until
            # the collective is waited on.
            send = view if self._reduces_scatter_in_place else view.clone()
            bucket.send_buffer = send
            bucket.work = reduce_scatter_single(self.grad_buffer[start:end], send,
                                                group=self.data_parallel_group, async_op=True)
        else:
            bucket.work = dist.all_reduce(view, group=self.data_parallel_group, async_op=True)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally (micro-batches before the last one)."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def finish_grad_sync(self) -> None:
        """Sum the shared parameters' gradients over the embedding group, start the buckets not
        started yet (the shared one, parameters without a gradient) and wait for all."""
        if self._shared_bucket is not None:
            self._sum_shared_grads(self._shared_bucket)
        for bucket in self.buckets:
            if bucket.work is None:
                self._start_reduce(bucket)
        for bucket in self.buckets:
            wait(bucket.work, self._timeout)
            bucket.work = None
            bucket.send_buffer = None
            bucket.pending = len(bucket.params)

    def _sum_shared_grads(self, bucket: _Bucket) -> None:
        """Add the other stage's gradient of each shared parameter to this one's (first and last
        pipeline stage, same TP and DP rank), before any DP reduction: after it both copies hold
        the same gradient, whether DP then all-reduces or reduce-scatters it."""
        from megallama.parallel import state

        group = state.get_embedding_group()
        if group is None:  # no pipeline: the one copy has the whole gradient
            return
        grads = self.grad_buffer[bucket.start:bucket.start + bucket.numel]
        wait(dist.all_reduce(grads, group=group, async_op=True), self._timeout)

    def zero_grad_buffer(self) -> None:
        self.grad_buffer.zero_()
        for bucket in self.buckets:
            if bucket.work is not None:
                raise RuntimeError("zero_grad_buffer() while a gradient reduction is in flight; "
                                   "call finish_grad_sync() first")
            bucket.pending = len(bucket.params)

    def scale_gradients(self, factor) -> None:
        """Multiply every gradient by ``factor`` (a number or a 0-d device tensor: no host read)."""
        self.grad_buffer.mul_(factor)


class _DoneWork:
    def wait(self, timeout=None):
        return True


def finalize_model_grads(model_chunks: List[DistributedDataParallel], losses: List[dict]) -> torch.Tensor:
    """Finish the DP reductions and turn summed-token-loss gradients into mean-token-loss ones.

    ``losses`` is what the schedule returned on this rank (non-empty on the last pipeline stage).
    The token count of the whole global batch is summed over the pipeline group (only the last
    stage has it) and the DP group; every gradient is divided by it. Returns that count (float64,
    on the device), never read here: a count of 0 makes every gradient non-finite, so the
    optimizer skips the step, and the caller reports it when it reads its checks.
    """
    from megallama.parallel import state

    for chunk in model_chunks:
        chunk.finish_grad_sync()
    num_tokens = torch.zeros((), dtype=torch.float64, device=model_chunks[0].grad_buffer.device)
    for item in losses:
        num_tokens += item["num_tokens"]
    if state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(num_tokens, group=state.get_pipeline_model_parallel_group())
    dist.all_reduce(num_tokens, group=model_chunks[0].data_parallel_group)
    # 1/count in float64 then float32: what multiplying by the Python float 1.0 / count.item() did.
    factor = (1.0 / num_tokens).float()
    for chunk in model_chunks:
        chunk.scale_gradients(factor)
    return num_tokens


# What the caller of finalize_model_grads reports when the count it returned is 0.
NO_TOKENS = "the global batch counted no tokens for the loss (all masked?)"


def global_loss_sums(losses: List[dict]) -> Optional[torch.Tensor]:
    """float64 ``[loss sum, loss-counted tokens]`` over the global batch, on the device (on the last
    pipeline stage; None elsewhere). A collective over the DP group, so every last-stage rank must
    call it."""
    if not losses:
        return None
    from megallama.parallel import state

    device = losses[0]["loss_sum"].device
    # Token counts are Python ints or device tensors; both summed on the device, never read.
    counts = [n.double() if torch.is_tensor(n) else torch.full((), n, dtype=torch.float64, device=device)
              for n in (item["num_tokens"] for item in losses)]
    sums = torch.stack([sum(item["loss_sum"].double() for item in losses), sum(counts)])
    dist.all_reduce(sums, group=state.get_data_parallel_group())
    return sums


def global_mean_loss(losses: List[dict]) -> Optional[torch.Tensor]:
    """Mean token loss over the global batch (on the last pipeline stage; None elsewhere); a
    collective, as :func:`global_loss_sums`."""
    sums = global_loss_sums(losses)
    return None if sums is None else (sums[0] / sums[1]).float()
