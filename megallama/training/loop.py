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
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from megallama.config import LlamaConfig
from megallama.distributed import (DistributedDataParallel, OptimizerConfig, build_optimizer,
                                   finalize_model_grads, global_mean_loss)
from megallama.model import LlamaModel
from megallama.parallel import get_rng_tracker, model_parallel_manual_seed, state
from megallama.pipeline import build_model_chunks, get_forward_backward_func
from megallama.planning.report import pretrain_memory_estimate
from megallama.training import checkpointing as ckpt
from megallama.training import sharded_state
from megallama.training.config import PretrainConfig
from megallama.training.exits import ExitSettings, ExitWatch
from megallama.training.flops import detect_peak_tflops
from megallama.training.logger import TrainingLogger
from megallama.training.lr_schedule import LRSchedule


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss or gradient norm); raised on every rank alike."""


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
    state.initialize_model_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                                    virtual_size(config), timeout=timeout)
    return device


def virtual_size(config: PretrainConfig) -> Optional[int]:
    v = config.parallel.virtual_pipeline_model_parallel_size(config.model.num_layers)
    return v if v is not None and v > 1 else None


def llama_config(config: PretrainConfig) -> LlamaConfig:
    m = config.model
    return LlamaConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size, vocab_size=m.vocab_size,
        max_position_embeddings=m.max_position_embeddings, norm_epsilon=m.norm_epsilon, rope_theta=m.rope_theta,
        init_method_std=m.init_method_std,
        sequence_parallel=config.parallel.sequence_parallel and config.parallel.tensor_model_parallel_size > 1,
        recompute_granularity=config.training.recompute_granularity,
        params_dtype=torch.bfloat16 if config.training.bf16 else torch.float32,
    )


@torch.no_grad()
def initialize_layout_free(chunk: LlamaModel, cfg: LlamaConfig, seed: int) -> None:
    """Re-draw the chunk's weights so they do not depend on the layout: each part (embedding, layer
    ``i``, head) comes from a one-part model built on the CPU under its own seed, as the model
    initialises it (so a GPU run starts from the same weights as a CPU run)."""
    fp32 = dataclasses.replace(cfg, params_dtype=torch.float32)
    parts = [(chunk.layers[str(i)], dict(layer_ids=[i], pre_process=False, post_process=False), i + 1)
             for i in (int(k) for k in chunk.layers)]
    for name, pre, post, offset in (("tok_embeddings", True, False, 0), ("output", False, True, cfg.num_layers + 1)):
        if hasattr(chunk, name):
            parts.append((chunk, dict(layer_ids=[], pre_process=pre, post_process=post), offset))
    for target, kwargs, offset in parts:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + offset)
            source = LlamaModel(fp32, **kwargs)
        if target is chunk:
            for key, value in source.state_dict().items():
                chunk.state_dict()[key].copy_(value)
        else:
            target.load_state_dict(source.layers[str(target.layer_id)].state_dict())


def build_model(config: PretrainConfig, device: torch.device) -> list[LlamaModel]:
    cfg = llama_config(config)

    def make_chunk(spec):
        with device:  # parameters are made where they will live: no whole-stage copy in host memory
            chunk = LlamaModel(cfg, pre_process=spec.pre_process, post_process=spec.post_process,
                               layer_ids=spec.layer_ids)
        initialize_layout_free(chunk, cfg, config.training.seed)
        return chunk

    return build_model_chunks(make_chunk, cfg.num_layers, virtual_size(config))


def build_datasets(config: PretrainConfig):
    t, d = config.training, config.data
    num_evals = t.train_iters // t.eval_interval + 1 if t.eval_iters else 0
    samples = [t.train_iters * t.global_batch_size, t.eval_iters * t.global_batch_size if num_evals else 0, 0]
    if d.mock_data:
        from megallama.data.gpt_dataset import MockGPTDataset

        seq, vocab = config.model.seq_length, config.model.vocab_size
        return (MockGPTDataset(seq, vocab, samples[0], seed=t.seed),
                MockGPTDataset(seq, vocab, samples[1], seed=t.seed + 1) if samples[1] else None)
    if d.sft_data_path:
        from megallama.data.sft_dataset import build_sft_datasets

        # Padding carries no loss and nothing attends to it: any id in the vocabulary will do.
        train, valid, _ = build_sft_datasets(d.sft_data_path, d.split, config.model.seq_length, samples, t.seed,
                                             pad_id=0, cache_dir=d.data_cache_path)
        return train, valid
    from megallama.data.blended import build_gpt_datasets

    train, valid, _ = build_gpt_datasets(d.data_path, d.split, config.model.seq_length, samples, t.seed,
                                         d.data_cache_path)
    if d.reset_attention_mask or d.eod_mask_loss:
        from megallama.data.sft_dataset import EODResetDataset
        from megallama.tokenizer import build_tokenizer

        eod = build_tokenizer(d.tokenizer_type, d.tokenizer_model, config.model.vocab_size).eod
        train, valid = (None if ds is None else EODResetDataset(ds, eod, d.reset_attention_mask, d.eod_mask_loss)
                        for ds in (train, valid))
    return train, valid


def micro_batches(dataset, batch_start: int, config: PretrainConfig, device: torch.device) -> list:
    """This DP rank's micro-batches of global batch starting at sample ``batch_start``: each
    micro-step takes ``micro × DP`` consecutive samples, DP rank ``d`` the ``d``-th ``micro`` of them."""
    m, dp = config.training.micro_batch_size, config.parallel.data_parallel_size
    dp_rank = state.get_data_parallel_rank()
    out = []
    for step in range(config.num_micro_batches):
        first = batch_start + step * m * dp + dp_rank * m
        samples = [dataset[i] for i in range(first, first + m)]
        # tokens, labels, and (packed or document-reset data) loss_mask and position_ids
        batch = tuple(torch.stack([torch.as_tensor(s[key]) for s in samples]) if key in samples[0] else None
                      for key in ("tokens", "labels", "loss_mask", "position_ids"))
        check_token_ids(batch[0], first, config)  # on the host copy: no device sync per micro-batch
        out.append(tuple(None if t is None else t.to(device) for t in batch))
    return out


def check_token_ids(tokens: torch.Tensor, first_sample: int, config: PretrainConfig) -> None:
    """An id the embedding has no row for is the data's fault (tokenized for another vocabulary):
    say so in one line instead of an index error deep inside the model."""
    vocab = config.model.vocab_size
    bad = (tokens >= vocab) | (tokens < 0)
    if bad.any():
        row = int(bad.any(dim=1).nonzero()[0])
        raise TrainingError(f"sample {first_sample + row} of the data holds token id "
                            f"{int(tokens[row][bad[row]][0])}, outside --vocab-size {vocab} (was the data "
                            "tokenized with another tokenizer?)")


def forward_step(data_iterator, chunk, input_tensor):
    tokens, labels, loss_mask, position_ids = next(data_iterator)
    model = chunk.module
    out = model(input_ids=tokens if model.pre_process else None,
                labels=labels if model.post_process else None, hidden_states=input_tensor,
                position_ids=position_ids)
    if loss_mask is None:
        return out, lambda per_token: (per_token.sum(), per_token.numel())
    return out, lambda per_token: ((per_token * loss_mask).sum(), loss_mask.sum())


class Trainer:
    """Holds the built run; ``train()`` runs it to ``--train-iters``."""

    def __init__(self, config: PretrainConfig, print_fn=print):
        self.started = time.monotonic()  # --exit-duration-in-mins counts set-up and loading too, as Megatron
        self.config = config
        self.device = init_distributed(config)
        device_bytes = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        estimate, fits = pretrain_memory_estimate(config, device_bytes)
        log0(estimate)
        if not fits:  # every rank computes the same estimate, so all stop together
            raise TrainingError(estimate.splitlines()[-1])
        model_parallel_manual_seed(config.training.seed, self.device.type)
        self.tp_rank = state.get_tensor_model_parallel_rank()
        self.tp_size = state.get_tensor_model_parallel_world_size()
        self.dp_rank = state.get_data_parallel_rank()
        self.dtype = torch.bfloat16 if config.training.bf16 else torch.float32
        self.iteration, self.consumed_samples = 0, 0
        if config.checkpoint.save and dist.get_rank() == 0:  # before any save of this run can be writing
            stale = ckpt.remove_stale_temporaries(config.checkpoint.save)
            if stale:
                log0(f"removed {len(stale)} temporary files of interrupted saves in {config.checkpoint.save}")
        # The data before the model: a dataset of another vocabulary stops the run here, not in it.
        self.train_data, self.valid_data = build_datasets(config)
        micro_batches(self.train_data, 0, config, torch.device("cpu"))
        chunks = build_model(config, self.device)
        loaded = self._find_checkpoint()
        if loaded:
            self._load_model(chunks, *loaded)
        elif config.checkpoint.finetune:
            self._load_pretrained(chunks)
        self.chunks = [DistributedDataParallel(c, use_distributed_optimizer=config.parallel.use_distributed_optimizer)
                       for c in chunks]
        o = config.optimizer
        self.optimizer = build_optimizer(OptimizerConfig(
            lr=config.lr_schedule.lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps, clip_grad=o.clip_grad,
            use_distributed_optimizer=config.parallel.use_distributed_optimizer), self.chunks)
        if loaded:
            self._load_training_state(*loaded)
        self.schedule = LRSchedule(config.lr_schedule)
        self.forward_backward = get_forward_backward_func(config.parallel.pipeline_model_parallel_size,
                                                          virtual_size(config))
        self.is_last_stage = state.is_pipeline_last_stage(ignore_virtual=True)
        peak = config.logging.peak_tflops or detect_peak_tflops(self.dtype, self.device)
        self.logger = TrainingLogger(config, enabled=dist.get_rank() == dist.get_world_size() - 1,
                                     num_devices=dist.get_world_size(), peak_tflops=peak, device=self.device,
                                     print_fn=print_fn)

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
        from megallama.inference.checkpoint_io import open_checkpoint
        from megallama.parallel import shard_like

        path = self.config.checkpoint.load
        try:
            reader = open_checkpoint(path)
        except (FileNotFoundError, KeyError, ValueError) as error:
            raise ckpt.CheckpointError(f"--finetune --load {path}: {error}") from None
        ours = llama_config(self.config)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
            theirs, mine = getattr(reader.config, name), getattr(ours, name)
            if theirs != mine:
                raise ckpt.CheckpointError(f"--finetune --load {path} has {name} {theirs}, the flags give {mine}")
        for chunk in chunks:
            for name, param in chunk.named_parameters():
                param.copy_(shard_like(param, reader.load(name)))
        log0(f"--finetune: loaded the {getattr(reader, 'format', '')} weights of {path}; iteration, optimizer "
             "and lr schedule start afresh")

    def _load_model(self, chunks, iteration, iter_dir, metadata):
        if not ckpt.has_checksums(metadata):
            log0(f"{iter_dir} was written before checkpoints carried checksums: loading it unverified")
        targets = [dataclasses.replace(p, write=True) for p in
                   sharded_state.model_pieces(chunks, self.tp_rank, self.tp_size, self.dp_rank)]
        ckpt.load_pieces(iter_dir, metadata, targets)
        log0(f"loaded model weights of iteration {iteration} from {iter_dir}")

    def _load_training_state(self, iteration, iter_dir, metadata):
        common = metadata["common"]
        self.iteration, self.consumed_samples = iteration, common["consumed_samples"]
        if not self.config.checkpoint.no_load_optim:
            pieces, buffers = sharded_state.optimizer_pieces(self.optimizer, self.tp_rank, self.tp_size,
                                                             self.dp_rank, destination=True)
            missing = set(ckpt.load_pieces(iter_dir, metadata, pieces, strict=False))
            sharded_state.install_optimizer_state(self.optimizer, buffers, common["optimizer_step"], missing)
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
        root = self.config.checkpoint.save
        pieces = sharded_state.model_pieces(self.chunks, self.tp_rank, self.tp_size, self.dp_rank)
        pieces += sharded_state.optimizer_pieces(self.optimizer, self.tp_rank, self.tp_size, self.dp_rank)[0]
        common = {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                  "optimizer_step": sharded_state.optimizer_step_count(self.optimizer),
                  "layout": self._layout(), "lr_schedule": self.schedule.state_dict(),
                  "config": self.config.to_dict()}
        rank_state = ckpt.capture_rng_state(extra={"tracker": get_rng_tracker().get_states()})
        start = time.perf_counter()
        ckpt.save_checkpoint(root, self.iteration, pieces, rank_state, common)
        log0(f"saved checkpoint of iteration {self.iteration} to {ckpt.checkpoint_dir(root, self.iteration)} "
             f"in {time.perf_counter() - start:.2f} s")

    # --- steps ------------------------------------------------------------------------------------

    def _run_schedule(self, dataset, batch_start: int, forward_only: bool):
        batches = micro_batches(dataset, batch_start, self.config, self.device)
        v = virtual_size(self.config)
        data = [iter(batches) for _ in range(v)] if v else iter(batches)
        c = self.config
        return self.forward_backward(
            forward_step, data, self.chunks, c.num_micro_batches, c.model.seq_length, c.training.micro_batch_size,
            c.model.hidden_size, self.dtype, forward_only=forward_only,
            sequence_parallel=llama_config(c).sequence_parallel)

    def train_step(self) -> tuple[Optional[float], float]:
        """One optimizer step on global batch ``iteration``; returns (loss on the last stage, grad norm)."""
        self.optimizer.zero_grad()
        losses = self._run_schedule(self.train_data, self.consumed_samples, forward_only=False)
        finalize_model_grads(self.chunks, losses)
        _, norm = self.optimizer.step()
        mean = global_mean_loss(losses) if self.is_last_stage else None
        loss = float(mean) if mean is not None else None
        # Only the last stage sees the loss: agree on finiteness everywhere so all ranks stop together.
        bad = torch.tensor([0.0 if loss is None or math.isfinite(loss) else 1.0], device=self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        norm = float(norm)
        if bad.item() or not math.isfinite(norm):
            raise TrainingError(f"iteration {self.iteration + 1}: lm loss {loss if loss is not None else '(other stage)'}, "
                                f"grad norm {norm}: not finite; stopping without saving a checkpoint")
        return loss, norm

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        for chunk in self.chunks:
            chunk.eval()
        # The same first eval_iters global batches every time, so validation points are comparable.
        total, n = 0.0, self.config.training.eval_iters
        for b in range(n):
            losses = self._run_schedule(self.valid_data, b * self.config.training.global_batch_size, True)
            if self.is_last_stage:
                total += float(global_mean_loss(losses))  # every batch counts the same number of tokens
        for chunk in self.chunks:
            chunk.train()
        return total / n if self.is_last_stage else None

    def train(self) -> list:
        """Run to ``--train-iters``; returns the losses of this run's iterations (last stage, else None)."""
        c = self.config
        history = []
        log0(f"training {c.model.num_layers} layers × {c.model.hidden_size} on {c.parallel.world_size} ranks: "
             f"TP={self.tp_size} PP={c.parallel.pipeline_model_parallel_size} DP={c.parallel.data_parallel_size} "
             f"virtual={virtual_size(c)}, {c.num_micro_batches} micro-batches of {c.training.micro_batch_size}, "
             f"from iteration {self.iteration}")
        saved_at = self.iteration  # a resumed run's starting point is already on disk
        t = c.training
        exits = ExitWatch(ExitSettings(t.exit_signal_handler, t.exit_duration_in_mins, t.exit_interval), self.device,
                          self.started)
        with exits.watching_signals():  # a signal during the last save must not cut it short
            saved_at = self._train_until_done_or_told(history, exits, saved_at)
            if c.checkpoint.save and saved_at != self.iteration:
                self.save()
        self.logger.close()
        return history

    def _train_until_done_or_told(self, history: list, exits: ExitWatch, saved_at: int) -> int:
        """Iterations up to ``--train-iters`` or an exit condition; returns the last saved iteration."""
        c = self.config
        while self.iteration < c.training.train_iters:
            start = time.perf_counter()
            lr = self.schedule.apply(self.optimizer, self.iteration + 1)
            loss, norm = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.iteration += 1
            self.consumed_samples += c.training.global_batch_size
            history.append(loss)
            self.logger.training_iteration(self.iteration, self.consumed_samples, loss if loss is not None else 0.0,
                                           lr, norm, time.perf_counter() - start)
            if self.valid_data is not None and c.training.eval_iters and self.iteration % c.training.eval_interval == 0:
                val = self.evaluate()
                if val is not None:
                    self.logger.validation(self.iteration, val)
            if c.checkpoint.save and c.checkpoint.save_interval and self.iteration % c.checkpoint.save_interval == 0:
                self.save()
                saved_at = self.iteration
            reason = exits.reason(self.iteration)
            if reason and self.iteration < c.training.train_iters:
                log0(f"{reason}: stopping after iteration {self.iteration}"
                     + (", saving a checkpoint" if c.checkpoint.save else " (no --save: nothing saved)"))
                break
        return saved_at


def shutdown() -> None:
    if state.model_parallel_is_initialized():
        state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
