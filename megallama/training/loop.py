"""The pretraining loop: process groups → model chunks → data → schedule → AdamW → checkpoints.

One ``PretrainConfig`` flows down; nothing reads global arguments. The same loop runs a single
process, a torchrun launch on CPUs (gloo) and GPUs (NCCL), in any (TP, PP, DP, virtual-stage)
layout, and the loss of every iteration is the serial run's: initial weights are drawn per layer
from a seed of (``--seed``, layer), never from where a layer happens to live, and the global batch
``k`` is samples ``[k·G, (k+1)·G)`` of the dataset whatever the data-parallel split.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch
import torch.distributed as dist

from megallama.checkpoint import sharded
from megallama.checkpoint import storage as ckpt
from megallama.distributed import (DistributedDataParallel, build_optimizer, finalize_model_grads,
                                   global_loss_sums, global_mean_loss)
from megallama.distributed.agreement import first_disagreement
from megallama.distributed.data_parallel import NO_TOKENS
from megallama.model import LlamaModel
from megallama.parallel import get_rng_tracker, model_parallel_manual_seed, state
from megallama.pipeline import ActivationShape, build_model_chunks, get_forward_backward_func
from megallama.planning.report import pretrain_memory_estimate
from megallama.training.arguments_model import ConfigError
from megallama.training.config import PretrainConfig
from megallama.training.exits import ExitSettings, ExitWatch
from megallama.training.flops import detect_peak_tflops
from megallama.training.forward_step import llama_forward_step
from megallama.training.input_checks import model_mismatch
from megallama.training.logger import TrainingLogger, host_values, params_norm
from megallama.training.lr_schedule import LRSchedule
from megallama.training.profiling import IterationProfiler
from megallama.training.run_contexts import attention_kernels, manual_garbage_collection


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss or gradient norm); raised on every rank alike."""


IGNORE_INDEX = -100  # labels the loss skips (the model's cross-entropy default)


def log0(message: str) -> None:
    """Print once for the whole job (global rank 0)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


# --- setup ---------------------------------------------------------------------------------------

def init_distributed(config: PretrainConfig) -> torch.device:
    """Process group from torchrun's environment (or a one-process group), then TP/PP/DP groups."""
    par = config.parallel
    use_cuda = torch.cuda.is_available() and par.distributed_backend != "gloo"
    backend = par.distributed_backend or ("nccl" if use_cuda else "gloo")
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=par.distributed_timeout_minutes)
    if not dist.is_initialized():
        if "RANK" in os.environ:
            # torchrun's agent keeps its store across --max-restarts and a restarted worker would read
            # the dead workers' gloo addresses from it (torch 2.13): each attempt gets its own keys.
            store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend, store=dist.PrefixStore(f"megallama/attempt_{attempt}", store),
                                    rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if dist.get_world_size() != par.world_size:
        raise RuntimeError(f"the flags were checked for world size {par.world_size}, the process group has "
                           f"{dist.get_world_size()}")
    # Before any work: ranks given other flags or files would train apart silently, or fail in a
    # collective (new_group included) without a cause.
    disagreement = first_disagreement(config.to_dict())
    if disagreement:
        raise ConfigError(disagreement)
    state.initialize_model_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                                    virtual_size(config), timeout=timeout)
    return device


def virtual_size(config: PretrainConfig) -> Optional[int]:
    v = config.parallel.virtual_pipeline_model_parallel_size(config.model.num_layers)
    return v if v is not None and v > 1 else None


def build_model(config: PretrainConfig, device: torch.device) -> list[LlamaModel]:
    cfg = config.model

    def make_chunk(spec):
        with device:  # parameters are made where they will live: no whole-stage copy in host memory
            chunk = LlamaModel(cfg, pre_process=spec.pre_process, post_process=spec.post_process,
                               layer_ids=spec.layer_ids)
        chunk.initialize_layout_free(config.training.seed)
        return chunk

    return build_model_chunks(make_chunk, cfg, virtual_size(config))


def build_datasets(config: PretrainConfig):
    t, d = config.training, config.data
    num_evals = t.train_iters // t.eval_interval + 1 if t.eval_iters else 0
    samples = [config.batch_schedule.consumed_after(t.train_iters), t.eval_iters * t.global_batch_size if num_evals else 0, 0]
    if d.mock_data:
        from megallama.data.gpt_dataset import MockGPTDataset

        seq, vocab = config.training.seq_length, config.model.vocab_size
        return (MockGPTDataset(seq, vocab, samples[0], seed=t.seed),
                MockGPTDataset(seq, vocab, samples[1], seed=t.seed + 1) if samples[1] else None)
    if d.separate_split_paths:
        from megallama.data.blended import build_gpt_datasets

        # Each split reads the whole of its own blend (Megatron's --train-data-path/--valid-data-path).
        train = build_gpt_datasets(d.train_data_path, "1,0,0", t.seq_length, [samples[0], 0, 0], t.seed,
                                   d.data_cache_path)[0]
        valid = build_gpt_datasets(d.valid_data_path, "0,1,0", t.seq_length, [0, samples[1], 0], t.seed,
                                   d.data_cache_path)[1] if d.valid_data_path and samples[1] else None
        return _with_document_resets(train, valid, config)
    if d.sft_data_path:
        from megallama.data.sft_dataset import build_sft_datasets

        # Padding carries no loss and nothing attends to it: any id in the vocabulary will do.
        train, valid, _ = build_sft_datasets(d.sft_data_path, d.split, config.training.seq_length, samples, t.seed,
                                             pad_id=0, cache_dir=d.data_cache_path)
        return train, valid
    from megallama.data.blended import build_gpt_datasets

    train, valid, _ = build_gpt_datasets(d.data_path, d.split, config.training.seq_length, samples, t.seed,
                                         d.data_cache_path)
    return _with_document_resets(train, valid, config)


def _with_document_resets(train, valid, config: PretrainConfig):
    d = config.data
    if d.reset_attention_mask or d.eod_mask_loss:
        from megallama.data.sft_dataset import EODResetDataset
        from megallama.tokenizer import build_tokenizer

        eod = build_tokenizer(d.tokenizer_type, d.tokenizer_model, config.model.vocab_size).eod
        train, valid = (None if ds is None else EODResetDataset(ds, eod, d.reset_attention_mask, d.eod_mask_loss)
                        for ds in (train, valid))
    return train, valid


def host_micro_batches(dataset, batch_start: int, global_batch_size: int, config: PretrainConfig,
                       pin: bool = False) -> list:
    """This DP rank's micro-batches of the global batch of ``global_batch_size`` samples starting at
    sample ``batch_start``, in host memory (page-locked with ``pin``, so that copies to a CUDA
    device need not wait): each micro-step takes ``micro × DP`` consecutive samples, DP rank ``d``
    the ``d``-th ``micro`` of them."""
    m, dp = config.training.micro_batch_size, config.parallel.data_parallel_size
    dp_rank = state.get_data_parallel_rank()
    out = []
    for step in range(config.num_micro_batches_of(global_batch_size)):
        first = batch_start + step * m * dp + dp_rank * m
        samples = [dataset[i] for i in range(first, first + m)]
        # tokens, labels, and (packed or document-reset data) loss_mask and position_ids
        batch = tuple(torch.stack([torch.as_tensor(s[key]) for s in samples]) if key in samples[0] else None
                      for key in ("tokens", "labels", "loss_mask", "position_ids"))
        check_batch(batch, first, config)  # on the host copy: no device sync per micro-batch
        out.append(tuple(None if t is None else t.pin_memory() for t in batch) if pin else batch)
    return out


def to_device(batches: list, device: torch.device) -> list:
    # Queued, not waited for: the copy runs on the device's stream before the kernels that read it.
    return [tuple(None if t is None else t.to(device, non_blocking=True) for t in batch) for batch in batches]


class BatchPrefetcher:
    """The training batches, read and collated by ``--num-workers`` threads up to that many global
    batches ahead of the iteration that needs them (0: in the calling thread). The batches are
    ``host_micro_batches``' whatever the number of threads: prefetching changes when, not what."""

    def __init__(self, dataset, config: PretrainConfig, pin: bool = False):
        self.dataset, self.config, self.pin = dataset, config, pin
        self.schedule = config.batch_schedule
        self.end = self.schedule.consumed_after(config.training.train_iters)
        workers = config.training.num_workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="megallama-batches") if workers else None
        self.pending: dict[int, Future] = {}

    def _read(self, batch_start: int) -> list:
        return host_micro_batches(self.dataset, batch_start, self.schedule.size_at(batch_start), self.config,
                                  self.pin)

    def get(self, batch_start: int) -> list:
        future = self.pending.pop(batch_start, None)
        batches = future.result() if future is not None else self._read(batch_start)
        if self.pool is not None:
            start = batch_start
            for _ in range(self.config.training.num_workers):
                start += self.schedule.size_at(start)
                if start >= self.end:
                    break
                if start not in self.pending:
                    self.pending[start] = self.pool.submit(self._read, start)
        return batches

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def check_batch(batch: tuple, first_sample: int, config: PretrainConfig) -> None:
    """The host copy of a micro-batch (tokens, labels, loss_mask, position_ids) checked for what
    the model checks only on host tensors (on a device the read would stall every step): ids the
    embedding or the loss has no row for, position_ids that do not start a document."""
    tokens, labels, _, position_ids = batch
    check_token_ids(tokens, first_sample, config)
    check_token_ids(labels, first_sample, config, what="label", ignore_index=IGNORE_INDEX)
    if position_ids is not None:
        bad = position_ids[:, 0] != 0
        if bad.any():
            raise TrainingError(f"sample {first_sample + int(bad.nonzero()[0])} of the data: position_ids must "
                                "start every row with 0 (the start of its first document)")


def check_token_ids(tokens: torch.Tensor, first_sample: int, config: PretrainConfig, what: str = "token",
                    ignore_index: Optional[int] = None) -> None:
    """An id the embedding (or the loss) has no row for is the data's fault (tokenized for another
    vocabulary): say so in one line instead of an index error deep inside the model."""
    vocab = config.model.vocab_size
    bad = (tokens >= vocab) | (tokens < 0)
    if ignore_index is not None:
        bad &= tokens != ignore_index
    if bad.any():
        row = int(bad.any(dim=1).nonzero()[0])
        raise TrainingError(f"sample {first_sample + row} of the data holds {what} id "
                            f"{int(tokens[row][bad[row]][0])}, outside --vocab-size {vocab} (was the data "
                            "tokenized with another tokenizer?)")


class DeferredChecks:
    """The step's failure checks, kept on the device and read only at the loop's check points
    (see ``Trainer._settle``), so that other iterations never wait for the device. Records the
    first failing iteration: (failed, iteration, loss, grad norm, counted no tokens), float64."""

    def __init__(self, device: torch.device):
        self.device = device
        self.first = torch.zeros(5, dtype=torch.float64, device=device)

    def _scalar(self, value: float) -> torch.Tensor:
        return torch.full((), value, dtype=torch.float64, device=self.device)  # a fill: no host→device copy

    def note(self, iteration: int, applied, loss: Optional[torch.Tensor], norm: torch.Tensor,
             no_tokens: torch.Tensor) -> None:
        failed = (~applied).double() if torch.is_tensor(applied) else self._scalar(float(not applied))
        loss = self._scalar(math.nan) if loss is None else loss.double()
        row = torch.stack([failed, self._scalar(iteration), loss, norm.double(), no_tokens.double()])
        self.first = torch.where(self.first[0] > 0, self.first, row)


class Trainer:
    """Holds the built run; ``train()`` runs it to ``--train-iters``."""

    def __init__(self, config: PretrainConfig, print_fn=print):
        self.started = time.monotonic()  # --exit-duration-in-mins counts set-up and loading too, as Megatron
        self.config = config
        self.device = init_distributed(config)
        device_bytes = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        estimate, fits = pretrain_memory_estimate(config, device_bytes,
                                                  staged_reduce_scatter=dist.get_backend() != "nccl")
        log0(estimate)
        if not fits:  # every rank computes the same estimate, so all stop together
            raise TrainingError(estimate.splitlines()[-1])
        model_parallel_manual_seed(config.training.seed, self.device.type)
        self.tp_rank = state.get_tensor_model_parallel_rank()
        self.tp_size = state.get_tensor_model_parallel_world_size()
        self.dp_rank = state.get_data_parallel_rank()
        self.dtype = config.model.params_dtype
        self.iteration, self.consumed_samples = 0, 0
        if config.checkpoint.save and dist.get_rank() == 0:  # before any save of this run can be writing
            stale = ckpt.remove_stale_temporaries(config.checkpoint.save)
            if stale:
                log0(f"removed {len(stale)} temporary files of interrupted saves in {config.checkpoint.save}")
        # The data before the model: a dataset of another vocabulary stops the run here, not in it.
        self.train_data, self.valid_data = build_datasets(config)
        host_micro_batches(self.train_data, 0, config.batch_schedule.size_at(0), config)
        chunks = build_model(config, self.device)
        loaded = self._find_checkpoint()
        if loaded:
            self._load_model(chunks, *loaded)
        elif config.checkpoint.finetune:
            self._load_pretrained(chunks)
        o = config.optimizer
        self.chunks = [DistributedDataParallel(c, use_distributed_optimizer=o.use_distributed_optimizer,
                                               overlap_grad_reduce=o.overlap_grad_reduce,
                                               overlap_param_gather=o.overlap_param_gather,
                                               gradient_accumulation_fusion=o.gradient_accumulation_fusion)
                       for c in chunks]
        self.optimizer = build_optimizer(config.optimizer, self.chunks)
        if loaded:
            self._load_training_state(*loaded)
        self.schedule = LRSchedule(config.lr_schedule, config.optimizer.lr, config.training.global_batch_size)
        self.batch_schedule = config.batch_schedule
        self.forward_backward = get_forward_backward_func(config.parallel.pipeline_model_parallel_size,
                                                          virtual_size(config), config.parallel.overlap_p2p_comm)
        self.activation_shape = ActivationShape(config.training.seq_length, config.training.micro_batch_size,
                                                config.model.hidden_size, self.dtype, config.model.sequence_parallel)
        self.is_last_stage = state.is_pipeline_last_stage()
        self.checks = DeferredChecks(self.device)
        self._unsettled: list = []  # this rank's losses (device tensors) of the iterations not read yet
        peak = config.logging.peak_tflops or detect_peak_tflops(self.dtype, self.device)
        self.logger = TrainingLogger(config, enabled=dist.get_rank() == dist.get_world_size() - 1,
                                     num_devices=dist.get_world_size(), peak_tflops=peak, device=self.device,
                                     print_fn=print_fn, params_norm=(lambda: params_norm(self.chunks, self.optimizer))
                                     if config.logging.log_params_norm else None)

    # --- checkpoints ------------------------------------------------------------------------------

    def _find_checkpoint(self):
        root = self.config.checkpoint.load
        if self.config.checkpoint.finetune:  # only this run's own checkpoints resume it
            root = self.config.checkpoint.save
            found = ckpt.latest_checkpoint(root) if root else None
            if found is not None:
                log0(f"--finetune: resuming this run from its checkpoint in {root}")
            return found
        if not root:
            return None
        found = ckpt.latest_checkpoint(root, self.config.checkpoint.ckpt_step)
        if found is None:
            log0(f"no checkpoint in {root} ({ckpt.TRACKER_FILENAME} not found): training from scratch")
        return found

    @torch.no_grad()
    def _load_pretrained(self, chunks) -> None:
        """``--finetune``: this rank's shard of each weight from ``--load`` (a megallama checkpoint of
        any layout, an HF or a Meta folder); iteration, optimizer and lr schedule start afresh."""
        from megallama.checkpoint import open_checkpoint
        from megallama.parallel import shard_like

        ck = self.config.checkpoint
        path = ck.load if ck.ckpt_step is None else ckpt.checkpoint_dir(ck.load, ck.ckpt_step)  # as when resuming
        try:
            reader = open_checkpoint(path)
        except (FileNotFoundError, KeyError, ValueError) as error:
            raise ckpt.CheckpointError(f"--finetune --load {path}: {error}") from None
        # A LLaMA-3 directory loaded without its --rotary-base or --use-rope-scaling would otherwise
        # train a different model without a word.
        problem = model_mismatch(reader.config, self.config.model)
        if problem:
            raise ckpt.CheckpointError(f"--finetune --load {path} {problem}")
        for chunk in chunks:
            for name, param in chunk.named_parameters():  # a tied head's copy reads the embedding
                param.copy_(shard_like(param, reader.load(sharded.stored_name(name, param))))
        log0(f"--finetune: loaded the {getattr(reader, 'format', '')} weights of {path}; iteration, optimizer "
             "and lr schedule start afresh")

    def _load_model(self, chunks, iteration, iter_dir, metadata):
        if not ckpt.has_checksums(metadata):
            log0(f"{iter_dir} was written before checkpoints carried checksums: loading it unverified")
        targets = [dataclasses.replace(p, write=True) for p in
                   sharded.model_pieces(chunks, self.tp_rank, self.tp_size, self.dp_rank)]
        ckpt.load_pieces(iter_dir, metadata, targets)
        log0(f"loaded model weights of iteration {iteration} from {iter_dir}")

    def _load_training_state(self, iteration, iter_dir, metadata):
        common = metadata["common"]
        self.iteration, self.consumed_samples = iteration, common["consumed_samples"]
        if not self.config.checkpoint.no_load_optim:
            pieces, buffers = sharded.optimizer_pieces(self.optimizer, self.tp_rank, self.tp_size,
                                                       self.dp_rank, destination=True)
            missing = set(ckpt.load_pieces(iter_dir, metadata, pieces, strict=False))
            sharded.install_optimizer_state(self.optimizer, buffers, common["optimizer_step"], missing)
        same_layout = common["layout"] == self._layout()
        if not self.config.checkpoint.no_load_rng:
            if same_layout:
                extra = ckpt.restore_rng_state(ckpt.read_rank_state(iter_dir, dist.get_rank(), metadata))
                get_rng_tracker().set_states(extra["tracker"])
            else:
                log0(f"the checkpoint was saved by layout {common['layout']}, this run is {self._layout()}: "
                     "RNG states not restored (LLaMA draws no random numbers while training)")

    def _layout(self) -> dict:
        p = self.config.parallel
        return {"world_size": p.world_size, "tensor": p.tensor_model_parallel_size,
                "pipeline": p.pipeline_model_parallel_size, "virtual": virtual_size(self.config)}

    def save(self) -> None:
        self.optimizer.finish_param_sync()  # the saved weights are the all-gathered ones
        ck = self.config.checkpoint
        pieces = sharded.model_pieces(self.chunks, self.tp_rank, self.tp_size, self.dp_rank)
        if not ck.no_save_optim:  # the stored config says so: a resume from it must give --no-load-optim
            pieces += sharded.optimizer_pieces(self.optimizer, self.tp_rank, self.tp_size, self.dp_rank)[0]
        layout = self._layout()
        if ck.no_save_rng:  # as a converted checkpoint's: a mark no run's layout equals, so none restores RNG
            layout["rng_states"] = "none (--no-save-rng)"
        common = {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                  "optimizer_step": sharded.optimizer_step_count(self.optimizer),
                  "layout": layout, "lr_schedule": self.schedule.state_dict(), "config": self.config.to_dict()}
        rank_state = {} if ck.no_save_rng else ckpt.capture_rng_state(extra={"tracker": get_rng_tracker().get_states()})
        start = time.perf_counter()
        ckpt.save_checkpoint(ck.save, self.iteration, pieces, rank_state, common)
        log0(f"saved checkpoint of iteration {self.iteration} to {ckpt.checkpoint_dir(ck.save, self.iteration)} "
             f"in {time.perf_counter() - start:.2f} s")

    # --- steps ------------------------------------------------------------------------------------

    def _run_schedule(self, batches: list, forward_only: bool):
        v = virtual_size(self.config)
        data = [iter(batches) for _ in range(v)] if v else iter(batches)
        return self.forward_backward(llama_forward_step, data, self.chunks, len(batches),
                                     self.activation_shape, forward_only=forward_only)

    def train_step(self) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """One optimizer step on global batch ``iteration``; returns (loss on the last stage, grad
        norm) as device tensors, read by nobody here. A non-finite loss or norm (or a batch without
        tokens) skips the update on the device and is noted in ``self.checks`` for ``_settle``."""
        start = time.perf_counter()
        self.optimizer.zero_grad()
        batches = to_device(self.batches.get(self.consumed_samples), self.device)
        fetched = time.perf_counter()
        losses = self._run_schedule(batches, forward_only=False)
        num_tokens = finalize_model_grads(self.chunks, losses)
        reduced = time.perf_counter()
        loss = global_mean_loss(losses) if self.is_last_stage else None
        no_tokens = num_tokens <= 0
        # Only the last stage sees the loss: agree on it everywhere (a device collective, no host
        # read) before the step, so every rank skips a non-finite loss's update alike. After a
        # failed iteration no update applies until the run stops at the next _settle.
        bad = no_tokens if loss is None else no_tokens | ~torch.isfinite(loss)
        bad = torch.maximum(bad.float(), self.checks.first[0].float()).reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        applied, norm = self.optimizer.step(found_inf=bad[0])
        self.checks.note(self.iteration + 1, applied, loss, norm, no_tokens)
        # Host times: on CUDA the time to enqueue each phase (what --log-timers-to-tensorboard writes).
        self.phase_seconds = {"batch-generator": fetched - start, "forward-backward": reduced - fetched,
                              "optimizer": time.perf_counter() - reduced}
        return loss, norm

    def _settle(self, history: list) -> None:
        """Read the deferred checks and this rank's losses since the last call, in one device→host
        copy: at log iterations, before validation, a save or an early exit, and at the end. Raises
        TrainingError for the first failed iteration, on every rank alike (the flags are agreed)."""
        if not self._unsettled:
            return
        failed, iteration, loss, norm, no_tokens, *losses = host_values([*self.checks.first.unbind(), *self._unsettled])
        history.extend(losses)
        self._unsettled = []
        if not failed:
            return
        if no_tokens:
            raise TrainingError(f"iteration {int(iteration)}: {NO_TOKENS}; stopping without saving a checkpoint")
        raise TrainingError(f"iteration {int(iteration)}: lm loss {loss if self.is_last_stage else '(other stage)'}, "
                            f"grad norm {norm}: not finite; stopping without saving a checkpoint")

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        self.optimizer.finish_param_sync()  # validation reads every parameter, not only through forward hooks
        for chunk in self.chunks:
            chunk.eval()
        # The same first eval_iters global batches every time, so validation points are comparable.
        # The loss is per token over all of them, as training's is: a batch with fewer loss-counted
        # tokens (instruction data masks the prompts) weighs less. Summed in float64 on the device and
        # read once, after the last batch.
        sums = None
        for b in range(self.config.training.eval_iters):
            size = self.config.training.global_batch_size  # the full batch, also while the training batch ramps up
            batches = host_micro_batches(self.valid_data, b * size, size, self.config, self.device.type == "cuda")
            losses = self._run_schedule(to_device(batches, self.device), True)
            if self.is_last_stage:
                batch_sums = global_loss_sums(losses)
                sums = batch_sums if sums is None else sums + batch_sums
        for chunk in self.chunks:
            chunk.train()
        return float(sums[0] / sums[1]) if self.is_last_stage else None

    def _micro_batches_text(self) -> str:
        """Micro-batches per iteration, as the first log line says them: ``8``, or ``2 → 8`` on a ramp."""
        sizes = self.batch_schedule.sizes()
        counts = [self.config.num_micro_batches_of(size) for size in (sizes[0], sizes[-1])]
        return f"{counts[0]} → {counts[1]} (--rampup-batch-size)" if len(sizes) > 1 else str(counts[1])

    def train(self) -> list:
        """Run to ``--train-iters``; returns the losses of this run's iterations (last stage, else None)."""
        c = self.config
        history = []
        log0(f"training {c.model.num_layers} layers × {c.model.hidden_size} on {c.parallel.world_size} ranks: "
             f"TP={self.tp_size} PP={c.parallel.pipeline_model_parallel_size} DP={c.parallel.data_parallel_size} "
             f"virtual={virtual_size(c)}, {self._micro_batches_text()} micro-batches of {c.training.micro_batch_size}, "
             f"from iteration {self.iteration}")
        saved_at = self.iteration  # a resumed run's starting point is already on disk
        t = c.training
        if self.iteration >= t.train_iters:  # else the run ends without a word (a finished run relaunched)
            log0(f"the checkpoint's iteration {self.iteration} is already at --train-iters {t.train_iters}: done")
        exits = ExitWatch(ExitSettings(t.exit_signal_handler, t.exit_duration_in_mins, t.exit_interval), self.device,
                          self.started)
        if t.profile and not t.use_pytorch_profiler and self.device.type != "cuda":
            log0("--profile: no CUDA device, so no profiler range to mark (--use-pytorch-profiler records on CPU)")
        self.profiler = IterationProfiler(t, c.logging.tensorboard_dir, dist.get_rank(), self.device)
        self.batches = BatchPrefetcher(self.train_data, c, pin=self.device.type == "cuda")
        try:
            # A signal during the last save must not cut it short.
            with exits.watching_signals(), attention_kernels(t.attention_backend), \
                    manual_garbage_collection(t.manual_gc):
                saved_at = self._train_until_done_or_told(history, exits, saved_at)
                if c.checkpoint.save and saved_at != self.iteration:
                    self.save()
        finally:
            self.batches.close()
            self.profiler.close()
        if self.profiler.table_path:
            print(f"rank {dist.get_rank()}: profile of iterations [{t.profile_step_start}, {t.profile_step_end}) "
                  f"in {self.profiler.table_path}", flush=True)
        self.logger.close()
        return history

    def _train_until_done_or_told(self, history: list, exits: ExitWatch, saved_at: int) -> int:
        """Iterations up to ``--train-iters`` or an exit condition; returns the last saved iteration.

        An iteration that does not log reads nothing from the device: losses, norms and the
        failure checks stay there until ``_settle``, before anything that acts on them."""
        c, t = self.config, self.config.training
        self.logger.start_timing()
        while self.iteration < t.train_iters:
            self.profiler.before(self.iteration)
            global_batch = self.batch_schedule.size_at(self.consumed_samples)
            lr = self.schedule.apply(self.optimizer, self.consumed_samples + global_batch)
            loss, norm = self.train_step()
            self.iteration += 1
            self.consumed_samples += global_batch
            self._unsettled.append(loss)
            if self.iteration % c.logging.log_interval == 0 or self.iteration == t.train_iters:
                self._settle(history)  # a failed iteration stops the run before its line is written
            self.logger.training_iteration(self.iteration, self.consumed_samples, loss, lr, norm, None,
                                           self.phase_seconds, global_batch_size=global_batch)
            if self.profiler.ends_after(self.iteration):
                self.logger.stop_timing()  # writing the trace is no iteration's time
                self.profiler.close()
                self.logger.start_timing()
            if t.manual_gc and t.manual_gc_interval and self.iteration % t.manual_gc_interval == 0:
                gc.collect()
            if self.valid_data is not None and t.eval_iters and self.iteration % t.eval_interval == 0:
                self._settle(history)
                self.logger.stop_timing()
                if t.manual_gc:
                    gc.collect()  # validation's garbage and training's apart, as Megatron's manual_gc_eval
                val = self.evaluate()
                if t.manual_gc:
                    gc.collect()
                if val is not None:
                    self.logger.validation(self.iteration, val)
                self.logger.start_timing()
            if c.checkpoint.save and c.checkpoint.save_interval and self.iteration % c.checkpoint.save_interval == 0:
                self._settle(history)  # never save after a failed iteration
                self.logger.stop_timing()
                self.save()
                saved_at = self.iteration
                self.logger.start_timing()
            reason = exits.reason(self.iteration)
            if reason and self.iteration < c.training.train_iters:
                self._settle(history)
                log0(f"{reason}: stopping after iteration {self.iteration}"
                     + (", saving a checkpoint" if c.checkpoint.save else " (no --save: nothing saved)"))
                break
        self._settle(history)
        return saved_at


def shutdown() -> None:
    if state.model_parallel_is_initialized():
        state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
