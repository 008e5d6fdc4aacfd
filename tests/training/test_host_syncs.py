"""Issue "GPU throughput": a training iteration that does not log reads nothing from the device.

On CUDA every host read of a device tensor (``.item()``, ``float(t)``, ``if t.any():``, ``nonzero``,
a boolean-mask index, a copy to the CPU) stalls the host until the device has run everything queued.
:class:`SyncDetector` records the aten ops that do that. These tests run on CPU tensors, which never
really wait, so every such op on a tensor the step computes counts as a sync, and so does
``Tensor.tolist``/``numpy`` (on a CPU tensor they read memory without an aten op). Two exceptions
are explicit: the host batch is built (and checked) before it goes to the device, so
``BatchPrefetcher.get`` runs with the detector paused, and so does ``ExitWatch.reason``, whose flags
are host values all-reduced on a host (gloo) group. The model's range checks run only on host
tensors (``megallama.host_checks``); here the step's CPU tensors stand for device ones, so they are
switched off as on CUDA (``test_range_checks_still_run_on_host_tensors`` keeps them honest).
"""
import contextlib
import math
import os
import threading

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from megallama import host_checks
from megallama.checkpoint import storage as ckpt
from megallama.parallel import state
from megallama.training import loop
from megallama.training.arguments import parse_args
from megallama.training.exits import ExitWatch
from tests.distributed_utils import run_distributed

aten = torch.ops.aten

# Ops that read a device tensor on the host whatever their arguments.
ALWAYS_SYNC = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal,
               aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive, aten._unique,
               aten._unique2}

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--untie-embeddings-and-output-weights", "--seq-length", "16", "--vocab-size", "64", "--lr", "1e-2",
        "--lr-warmup-iters", "2", "--lr-decay-iters", "8", "--mock-data", "--global-batch-size", "8",
        "--micro-batch-size", "2", "--eval-iters", "0"]
LOG_INTERVAL, ITERS = 3, 7
NON_LOGGING = [i for i in range(1, ITERS + 1) if i % LOG_INTERVAL and i != ITERS]


def _has_bool_index(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _forces_sync(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in ALWAYS_SYNC:
        return True
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        return _has_bool_index(args[1])  # a mask's true count decides the shape: read on the host
    if packet is aten.repeat_interleave:
        return kwargs.get("output_size") is None and torch.is_tensor(args[0]) and \
            (len(args) < 2 or torch.is_tensor(args[1]))
    if packet is aten._to_copy:
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"
    if packet is aten.copy_:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


HOST_READS = ("tolist", "numpy")  # Tensor methods that read a CPU tensor without dispatching an op


class SyncDetector(TorchDispatchMode):
    """Records (tag, op) for every op that would make the host wait for a device; ``tag`` is what
    the test sets (the iteration running). Sees the ops of the thread that entered it."""

    def __init__(self):
        super().__init__()
        self.records, self.tag, self.paused = [], None, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and _forces_sync(func, args, kwargs):
            self.records.append((self.tag, str(func)))
        return func(*args, **kwargs)

    def _recording(self, name, method):
        thread = threading.get_ident()

        def read(tensor, *args, **kwargs):
            if not self.paused and threading.get_ident() == thread:
                self.records.append((self.tag, f"Tensor.{name}"))
            return method(tensor, *args, **kwargs)
        return read

    def __enter__(self):
        self._own = {name: torch.Tensor.__dict__.get(name) for name in HOST_READS}
        for name in HOST_READS:
            setattr(torch.Tensor, name, self._recording(name, getattr(torch.Tensor, name)))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, own in self._own.items():
            if own is None:
                delattr(torch.Tensor, name)  # inherited from TensorBase again
            else:
                setattr(torch.Tensor, name, own)
        return super().__exit__(*exc)

    @contextlib.contextmanager
    def pause(self):
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


def _watched_training(config, detector: SyncDetector, monkeypatch) -> list:
    """Trains ``config`` with the detector on; each record is tagged with the iteration whose step
    or bookkeeping (logging, checks) was running."""
    step, get, reason = loop.Trainer.train_step, loop.BatchPrefetcher.get, ExitWatch.reason

    def tagged_step(self):
        detector.tag = self.iteration + 1
        return step(self)

    def host_batches(self, batch_start):
        with detector.pause():  # the host copy, built and checked before it goes to the device
            return get(self, batch_start)

    def host_flags(self, iteration):
        assert self.group is None or dist.get_backend(self.group) == "gloo"
        with detector.pause():  # host values, agreed on a host group
            return reason(self, iteration)

    monkeypatch.setattr(loop.Trainer, "train_step", tagged_step)
    monkeypatch.setattr(loop.BatchPrefetcher, "get", host_batches)
    monkeypatch.setattr(ExitWatch, "reason", host_flags)
    monkeypatch.setattr(host_checks, "readable_without_sync", lambda tensor: False)  # as on a device
    trainer = loop.Trainer(config, print_fn=lambda line: None)
    with detector:
        return trainer.train()


def test_detector_sees_host_reads():
    detector = SyncDetector()
    x = torch.arange(6.0)
    with detector:
        x.sum().item()
        float(x.max())
        if (x > 2).any():
            x[x > 2]
        x.nonzero()
        torch.repeat_interleave(torch.tensor([1, 2]))
        x.tolist()
        x + 1  # no read
    ops = [op for _, op in detector.records]
    assert ops == ["aten._local_scalar_dense.default"] * 3 + ["aten.index.Tensor", "aten.nonzero.default",
                                                             "aten.repeat_interleave.Tensor", "Tensor.tolist"], ops
    assert "tolist" not in torch.Tensor.__dict__  # put back


def _single(monkeypatch, *flags):
    config = parse_args([*TINY, "--train-iters", str(ITERS), "--log-interval", str(LOG_INTERVAL), *flags], env={})
    detector = SyncDetector()
    try:
        losses = _watched_training(config, detector, monkeypatch)
    finally:
        loop.shutdown()
    return detector.records, losses


@pytest.mark.parametrize("flags", [(), ("--use-distributed-optimizer", "--num-workers", "2",
                                        "--exit-duration-in-mins", "1000", "--exit-signal-handler")])
def test_iterations_that_do_not_log_read_nothing_from_the_device(monkeypatch, flags):
    records, losses = _single(monkeypatch, *flags)
    assert [r for r in records if r[0] in NON_LOGGING] == []
    # The logging iterations do read (one copy each): the detector is live inside the run.
    assert {r[0] for r in records if r[0] is not None} == {3, 6, 7}
    assert len(losses) == ITERS and all(isinstance(v, float) and math.isfinite(v) for v in losses)


def _distributed(flags: tuple) -> list:
    config = parse_args([*TINY, "--train-iters", str(ITERS), "--log-interval", str(LOG_INTERVAL), *flags],
                        env={"WORLD_SIZE": "4"}, check_files=False)
    detector = SyncDetector()
    with pytest.MonkeyPatch.context() as monkeypatch:
        try:
            _watched_training(config, detector, monkeypatch)
        finally:
            state.destroy_model_parallel()  # the process group is the harness's
    return {"syncs": [f"{tag}: {op}" for tag, op in detector.records if tag in NON_LOGGING],
            "tags": sorted({tag for tag, _ in detector.records if tag is not None})}


def test_no_host_reads_with_tensor_pipeline_and_data_parallelism():
    layouts = [("--tensor-model-parallel-size", "2", "--use-distributed-optimizer"),
               ("--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--num-workers", "1")]
    for flags in layouts:
        assert run_distributed(_distributed, 4, flags, timeout=300) == [{"syncs": [], "tags": [3, 6, 7]}] * 4, flags


def test_range_checks_still_run_on_host_tensors():
    from megallama.model import linear_cross_entropy

    with pytest.raises(ValueError, match=r"target ids must lie in \[0, 4\)"):
        linear_cross_entropy(torch.zeros(2, 3), torch.zeros(4, 3), torch.tensor([1, 4]))


def test_the_host_batch_is_checked_for_what_the_model_checks_only_on_host_tensors():
    config = parse_args([*TINY, "--train-iters", "1"], env={})
    tokens = torch.zeros(2, 4, dtype=torch.int64)
    labels = torch.tensor([[1, 2, -100, 3], [1, 2, 3, 4]])
    loop.check_batch((tokens, labels, None, None), 10, config)  # the ignored label is no error
    with pytest.raises(loop.TrainingError, match=r"^sample 11 of the data holds label id 64, outside --vocab-size 64"):
        loop.check_batch((tokens, labels.where(labels != 4, 64), None, None), 10, config)
    positions = torch.tensor([[0, 1, 0, 1], [1, 2, 3, 0]])
    with pytest.raises(loop.TrainingError, match=r"^sample 11 of the data: position_ids must start every row with 0"):
        loop.check_batch((tokens, labels, None, positions), 10, config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_iterations_that_do_not_log_never_synchronise(monkeypatch):
    """CUDA's own sync debugger raises on any synchronising call outside the logging iterations."""
    step = loop.Trainer.train_step
    logging = {i - 1 for i in range(1, ITERS + 1) if i not in NON_LOGGING}  # the iteration before a log

    def strict_step(self):
        # From the step of a non-logging iteration to the next step: everything that iteration does.
        torch.cuda.set_sync_debug_mode(0 if self.iteration in logging else "error")
        return step(self)

    monkeypatch.setattr(loop.Trainer, "train_step", strict_step)
    config = parse_args([*TINY, "--train-iters", str(ITERS), "--log-interval", str(LOG_INTERVAL), "--bf16"], env={})
    try:
        losses = loop.Trainer(config, print_fn=lambda line: None).train()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        loop.shutdown()
    assert len(losses) == ITERS


# --- non-finite losses and norms, deferred to the next check point ------------------------------

def _poison(monkeypatch, iteration: int, what: str):
    """A NaN in the loss (or in one gradient) of ``iteration`` only."""
    if what == "loss":
        original = loop.global_mean_loss
        calls = []

        def poisoned(losses):
            calls.append(1)
            mean = original(losses)
            return mean * float("nan") if len(calls) == iteration else mean

        monkeypatch.setattr(loop, "global_mean_loss", poisoned)
    else:
        original = loop.finalize_model_grads
        calls = []

        def poisoned(chunks, losses):
            calls.append(1)
            count = original(chunks, losses)
            if len(calls) == iteration:
                chunks[0].grad_buffer[0] = float("nan")
            return count

        monkeypatch.setattr(loop, "finalize_model_grads", poisoned)


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_a_nan_is_never_applied_and_stops_the_run_at_the_next_check(monkeypatch, tmp_path, what):
    """NaN in iteration 4 of 7, logs every 3 and saves every 3: the run goes on to iteration 6 (the
    next check point), raises naming iteration 4, saves nothing after iteration 3, and its weights
    are those after iteration 3 (no update from iteration 4 on)."""
    flags = [*TINY, "--train-iters", str(ITERS), "--log-interval", "3"]
    reference = loop.Trainer(parse_args([*flags, "--train-iters", "3"], env={}), print_fn=lambda line: None)
    try:
        reference.train()
        expected = {n: p.detach().clone() for c in reference.chunks for n, p in c.module.named_parameters()}
    finally:
        loop.shutdown()
    _poison(monkeypatch, 4, what)
    trainer = loop.Trainer(parse_args([*flags, "--save", str(tmp_path), "--save-interval", "3"], env={}),
                           print_fn=lambda line: None)
    try:
        with pytest.raises(loop.TrainingError, match=r"^iteration 4: lm loss .*, grad norm .*: not finite; "
                                                    r"stopping without saving a checkpoint$") as error:
            trainer.train()
        assert trainer.iteration == 6
        assert ("lm loss nan" in str(error.value)) == (what == "loss")
        assert ("grad norm nan" in str(error.value)) == (what == "grad")
        assert ckpt.read_tracker(str(tmp_path)) == 3 and not os.path.exists(ckpt.checkpoint_dir(str(tmp_path), 6))
        for name, param in ((n, p) for c in trainer.chunks for n, p in c.module.named_parameters()):
            assert torch.equal(param, expected[name]), name
    finally:
        loop.shutdown()


def test_a_batch_without_tokens_stops_the_run_with_its_message(monkeypatch):
    original = loop.finalize_model_grads

    def no_tokens(chunks, losses):
        return original(chunks, losses) * 0

    monkeypatch.setattr(loop, "finalize_model_grads", no_tokens)
    trainer = loop.Trainer(parse_args([*TINY, "--train-iters", "2", "--log-interval", "2"], env={}),
                           print_fn=lambda line: None)
    try:
        with pytest.raises(loop.TrainingError, match=r"^iteration 1: the global batch counted no tokens for the "
                                                    r"loss \(all masked\?\); stopping without saving a checkpoint$"):
            trainer.train()
    finally:
        loop.shutdown()


# --- the same numbers as the host-reading code ------------------------------------------------

def _legacy_finalize_model_grads(chunks, losses):
    """finalize_model_grads as it was, reading the token count on the host."""
    import torch.distributed as dist

    for chunk in chunks:
        chunk.finish_grad_sync()
    num_tokens = torch.zeros((), dtype=torch.float64)
    for item in losses:
        num_tokens += item["num_tokens"]
    if state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(num_tokens, group=state.get_pipeline_model_parallel_group())
    dist.all_reduce(num_tokens, group=chunks[0].data_parallel_group)
    for chunk in chunks:
        chunk.scale_gradients(1.0 / num_tokens.item())
    return num_tokens


def _run_lines(*flags):
    lines = []
    trainer = loop.Trainer(parse_args([*TINY, "--log-interval", "1", *flags], env={}), print_fn=lines.append)
    try:
        losses = trainer.train()
        params = {n: p.detach().clone() for c in trainer.chunks for n, p in c.module.named_parameters()}
    finally:
        loop.shutdown()
    norms = [float(line.split("grad norm ")[1].split()[0]) for line in lines if line.startswith("iteration")]
    return losses, norms, params


@pytest.mark.parametrize("clip, flags", [(0.76, ()), (0.76, ("--bf16", "--use-distributed-optimizer"))])
def test_losses_and_weights_are_the_host_reading_codes_bit_for_bit(monkeypatch, clip, flags):
    """Against the host-reading path of the same fused AdamW: the norm read to skip and clip with a
    Python float, the token count read to scale the gradients."""
    from megallama.distributed.optimizer import _OptimizerBase

    flags = ("--train-iters", "5", "--clip-grad", str(clip), *flags)
    losses, norms, params = _run_lines(*flags)
    assert min(norms) < clip < max(norms), "both clipped steps and steps the clip leaves alone"
    monkeypatch.setattr(_OptimizerBase, "skips_on_device", property(lambda self: False))
    monkeypatch.setattr(loop, "finalize_model_grads", _legacy_finalize_model_grads)
    legacy_losses, legacy_norms, legacy_params = _run_lines(*flags)
    assert losses == legacy_losses and norms == legacy_norms
    assert all(torch.equal(params[name], legacy_params[name]) for name in params)
