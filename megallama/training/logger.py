"""Progress reports every ``--log-interval``: one console line and TensorBoard scalars.

TensorBoard tags are Megatron-LM's (``lm loss``, ``learning-rate``, ``grad-norm``,
``iteration-time``, ``lm loss validation``, ``mem-max-allocated-bytes``) so existing dashboards
work, plus ``tokens-per-second``, ``tflops`` (per device) and ``mfu``; the step is the 1-based
iteration. Megatron's logging flags add their tags: ``--log-throughput`` ``throughput``,
``--log-timers-to-tensorboard`` the ``*-time`` of each phase, ``--log-memory-to-tensorboard``
``mem-allocated-bytes`` and ``mem-reserved-bytes``, ``--log-validation-ppl-to-tensorboard`` ``lm loss
validation ppl``, ``--log-params-norm`` ``params-norm`` (also on the console line). With
``--wandb-project`` the same scalars also go to Weights & Biases. Values are averages over the
iterations since the previous report (loss, times) or the latest value (learning rate, gradient
norm). Only one rank reports: the caller passes ``enabled=True`` on the rank that
holds the loss (the last pipeline stage).

Loss and gradient norm may be handed over as device tensors: they are read at a report only, in
one device→host copy, so an iteration that does not report never waits for the device. The
iteration time is then the wall time between reports (the device synchronised at both ends, time
outside training left out by :meth:`TrainingLogger.stop_timing`), divided by the iterations. The
``*-time`` phases of ``--log-timers-to-tensorboard`` are host times: on CUDA, the time to enqueue
a phase's work, not to run it.
"""
from __future__ import annotations

import math
import os
import resource
import time
from typing import Callable, Optional

import torch

from megallama.training.config import PretrainConfig
from megallama.training.flops import estimate_flops, estimate_mfu, tflops_per_device

TAGS = ("lm loss", "learning-rate", "grad-norm", "iteration-time", "lm loss validation",
        "tokens-per-second", "tflops", "mfu", "mem-max-allocated-bytes")
# The phases the trainer times for --log-timers-to-tensorboard (tags: "<phase>-time").
TIMED_PHASES = ("batch-generator", "forward-backward", "optimizer")
WANDB_MISSING = "--wandb-project needs Weights & Biases: pip install -e .[wandb]"


def peak_memory_bytes(device: Optional[torch.device] = None) -> int:
    """Peak CUDA memory allocated on ``device``; on CPU the process's peak resident set size."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_bytes(device: Optional[torch.device] = None) -> dict[str, int]:
    """Memory now (``--log-memory-to-tensorboard``): CUDA's allocated and reserved bytes; on CPU the
    process's resident set size."""
    if device is not None and device.type == "cuda":
        return {"mem-allocated-bytes": torch.cuda.memory_allocated(device),
                "mem-reserved-bytes": torch.cuda.memory_reserved(device)}
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return {"mem-allocated-bytes": resident_pages * os.sysconf("SC_PAGE_SIZE")}


def params_norm(chunks, optimizer) -> torch.Tensor:
    """L2 norm of the model's parameters (Megatron's ``--log-params-norm``), each counted once as the
    gradient norm counts it: a collective over TP and PP, so every rank calls it."""
    from megallama.distributed.clip_grads import global_grad_norm, grads_for_norm

    optimizer.finish_param_sync()  # with --overlap-param-gather the step's weights may still be arriving
    # Every DP rank holds the whole weights (ZeRO-1 shards only the optimizer's state): no sum over DP.
    return global_grad_norm(grads_for_norm((p, p.detach(), 0) for chunk in chunks for p in chunk.parameters()))


def host_values(values: list) -> list:
    """``values`` (floats, None, 0-dim tensors) as Python floats (None stays None), all the tensors
    read in one device→host copy."""
    tensors = [v for v in values if torch.is_tensor(v)]
    read = iter(torch.stack([t.detach().double() for t in tensors]).tolist() if tensors else [])
    return [next(read) if torch.is_tensor(v) else v for v in values]


def start_wandb(config: PretrainConfig):
    """A Weights & Biases run for ``--wandb-project`` (imported only then; it is an optional extra)."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError(WANDB_MISSING) from None
    log = config.logging
    save_dir = log.wandb_save_dir or (os.path.join(config.checkpoint.save, "wandb") if config.checkpoint.save else None)
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
    return wandb.init(project=log.wandb_project, name=log.wandb_exp_name or None, dir=save_dir,
                      config=config.to_dict())


class TrainingLogger:
    def __init__(
        self,
        config: PretrainConfig,
        *,
        enabled: bool,
        num_devices: int,
        peak_tflops: Optional[float],
        device: Optional[torch.device] = None,
        print_fn: Callable[[str], None] = print,
        params_norm: Optional[Callable[[], torch.Tensor]] = None,
    ):
        self.enabled = enabled
        self.params_norm = params_norm  # --log-params-norm: computed at each report, on every rank
        self.interval = config.logging.log_interval
        self.train_iters = config.training.train_iters
        self.global_batch_size = config.training.global_batch_size
        self.ramps = len(config.batch_schedule.sizes()) > 1  # then each line says its global batch size
        self.seq_length = config.training.seq_length
        m = config.model
        self.flops_per_sequence = estimate_flops(
            num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
            seq_length=self.seq_length, vocab_size=m.vocab_size, num_sequences=1,
            num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups, kv_channels=m.kv_channels,
        )
        self.num_devices = num_devices
        self.peak_tflops = peak_tflops
        self.device = device
        self.print = print_fn
        self.options = config.logging
        self.writer = None
        if enabled and config.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=config.logging.tensorboard_dir)
        self.wandb_run = start_wandb(config) if enabled and config.logging.wandb_project else None
        self._since: Optional[float] = None  # wall-clock timing: when the current stretch began
        self._reset()

    def _reset(self):
        self._losses, self._seconds, self._sequences = [], 0.0, 0
        self._phase_seconds = dict.fromkeys(TIMED_PHASES, 0.0)

    def _synchronize(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start_timing(self) -> None:
        """Time iterations by the wall clock from now (for callers that pass no ``seconds``)."""
        self._synchronize()
        self._since = time.perf_counter()

    def stop_timing(self) -> None:
        """Leave what follows (validation, a save) out of the iteration time until
        :meth:`start_timing`."""
        if self._since is not None:
            self._synchronize()
            self._seconds += time.perf_counter() - self._since
            self._since = None

    def _write(self, scalars: dict, iteration: int) -> None:
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, iteration)
            self.writer.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=iteration)

    def training_iteration(
        self, iteration: int, consumed_samples: int, loss, lr: float, grad_norm,
        seconds: Optional[float] = None, phase_seconds: Optional[dict[str, float]] = None,
        global_batch_size: Optional[int] = None,
    ) -> Optional[str]:
        """Record one iteration; at a report iteration print the line and return it. ``loss`` and
        ``grad_norm``: floats or 0-dim (device) tensors (``loss`` None on a rank without it);
        ``seconds``: the iteration's time, None when timed by the wall clock (:meth:`start_timing`);
        ``phase_seconds``: the ``TIMED_PHASES``' times in it; ``global_batch_size``: its sequences
        (default ``--global-batch-size``; less while ``--rampup-batch-size`` ramps)."""
        self._losses.append(loss)
        global_batch_size = global_batch_size or self.global_batch_size
        self._sequences += global_batch_size
        if seconds is not None:
            self._seconds += seconds
        for phase, value in (phase_seconds or {}).items():
            self._phase_seconds[phase] += value
        if iteration % self.interval and iteration != self.train_iters:
            return None
        norm_of_params = self.params_norm() if self.params_norm is not None else None
        # this report's one device read
        *losses, grad_norm, norm_of_params = host_values([*self._losses, grad_norm, norm_of_params])
        timing = self._since is not None
        if timing:
            self.stop_timing()
        n = len(losses)
        mean_loss = sum(0.0 if v is None else v for v in losses) / n
        seconds_per_iteration = self._seconds / n
        flops_per_iteration = self.flops_per_sequence * self._sequences / n
        tokens_per_second = self._sequences * self.seq_length / self._seconds
        phase_means = {f"{phase}-time": value / n for phase, value in self._phase_seconds.items()}
        self._reset()
        if timing:
            self.start_timing()
        tflops = tflops_per_device(flops_per_iteration, seconds_per_iteration, self.num_devices)
        mfu = estimate_mfu(flops_per_iteration, seconds_per_iteration, self.num_devices, self.peak_tflops)
        memory = peak_memory_bytes(self.device)
        if not self.enabled:
            return None
        grad_text = "n/a" if grad_norm is None else f"{grad_norm:.6E}"
        mfu_text = "n/a (no --peak-tflops)" if mfu is None else f"{100 * mfu:.2f}%"
        line = (
            f"iteration {iteration:>8d}/{self.train_iters} | consumed samples {consumed_samples} | "
            f"consumed tokens {consumed_samples * self.seq_length} | "
            + (f"global batch size {global_batch_size} | " if self.ramps else "") +
            f"lm loss {mean_loss:.6E} | learning rate {lr:.6E} | grad norm {grad_text} | "
            + ("" if norm_of_params is None else f"params norm {norm_of_params:.6E} | ") +
            f"ms per iteration {1000 * seconds_per_iteration:.1f} | tokens/s {tokens_per_second:.1f} | "
            f"TFLOP/s per device {tflops:.4g} | MFU {mfu_text} | peak memory {memory / 2**30:.2f} GiB"
        )
        self.print(line)
        scalars = {"lm loss": mean_loss, "learning-rate": lr, "iteration-time": seconds_per_iteration,
                   "tokens-per-second": tokens_per_second, "tflops": tflops, "mem-max-allocated-bytes": memory}
        if grad_norm is not None:
            scalars["grad-norm"] = grad_norm
        if norm_of_params is not None:
            scalars["params-norm"] = norm_of_params
        if mfu is not None:
            scalars["mfu"] = mfu
        if self.options.log_throughput:
            scalars["throughput"] = tflops  # Megatron's tag: TFLOP/s per device
        if self.options.log_timers_to_tensorboard:
            scalars.update(phase_means)
        if self.options.log_memory_to_tensorboard:
            scalars.update(memory_bytes(self.device))
        self._write(scalars, iteration)
        return line

    def validation(self, iteration: int, loss: float) -> Optional[str]:
        if not self.enabled:
            return None
        line = f"validation at iteration {iteration} | lm loss validation {loss:.6E}"
        scalars = {"lm loss validation": loss}
        if self.options.log_validation_ppl_to_tensorboard:
            perplexity = math.exp(min(20.0, loss))  # capped as Megatron's, so a diverged run stays plottable
            scalars["lm loss validation ppl"] = perplexity
            line += f" | lm loss validation ppl {perplexity:.6E}"
        self.print(line)
        self._write(scalars, iteration)
        return line

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
