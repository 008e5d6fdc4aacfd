"""Progress reports every ``--log-interval``: one console line and TensorBoard scalars.

TensorBoard tags are Megatron-LM's (``lm loss``, ``learning-rate``, ``grad-norm``,
``iteration-time``, ``lm loss validation``, ``mem-max-allocated-bytes``) so existing dashboards
work, plus ``tokens-per-second``, ``tflops`` (per device) and ``mfu``; the step is the 1-based
iteration. Values are averages over the iterations since the previous report (loss, time) or the
latest value (learning rate, gradient norm). Only one rank reports: the caller passes
``enabled=True`` on the rank that holds the loss (the last pipeline stage).
"""
from __future__ import annotations

import resource
from typing import Callable, Optional

import torch

from megallama.training.config import PretrainConfig
from megallama.training.flops import estimate_flops, estimate_mfu, tflops_per_device

TAGS = ("lm loss", "learning-rate", "grad-norm", "iteration-time", "lm loss validation",
        "tokens-per-second", "tflops", "mfu", "mem-max-allocated-bytes")


def peak_memory_bytes(device: Optional[torch.device] = None) -> int:
    """Peak CUDA memory allocated on ``device``; on CPU the process's peak resident set size."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


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
    ):
        self.enabled = enabled
        self.interval = config.logging.log_interval
        self.train_iters = config.training.train_iters
        self.tokens_per_iteration = config.tokens_per_iteration
        self.seq_length = config.model.seq_length
        m = config.model
        self.flops_per_iteration = estimate_flops(
            num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
            seq_length=m.seq_length, vocab_size=m.vocab_size, num_sequences=config.training.global_batch_size,
        )
        self.num_devices = num_devices
        self.peak_tflops = peak_tflops
        self.device = device
        self.print = print_fn
        self.writer = None
        if enabled and config.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=config.logging.tensorboard_dir)
        self._reset()

    def _reset(self):
        self._losses, self._seconds = [], 0.0

    def training_iteration(
        self, iteration: int, consumed_samples: int, loss: float, lr: float, grad_norm: Optional[float],
        seconds: float,
    ) -> Optional[str]:
        """Record one iteration; at a report iteration print the line and return it."""
        self._losses.append(loss)
        self._seconds += seconds
        if iteration % self.interval and iteration != self.train_iters:
            return None
        n = len(self._losses)
        mean_loss = sum(self._losses) / n
        seconds_per_iteration = self._seconds / n
        self._reset()
        tokens_per_second = self.tokens_per_iteration / seconds_per_iteration
        tflops = tflops_per_device(self.flops_per_iteration, seconds_per_iteration, self.num_devices)
        mfu = estimate_mfu(self.flops_per_iteration, seconds_per_iteration, self.num_devices, self.peak_tflops)
        memory = peak_memory_bytes(self.device)
        if not self.enabled:
            return None
        grad_text = "n/a" if grad_norm is None else f"{grad_norm:.6E}"
        mfu_text = "n/a (no --peak-tflops)" if mfu is None else f"{100 * mfu:.2f}%"
        line = (
            f"iteration {iteration:>8d}/{self.train_iters} | consumed samples {consumed_samples} | "
            f"consumed tokens {consumed_samples * self.seq_length} | "
            f"lm loss {mean_loss:.6E} | learning rate {lr:.6E} | grad norm {grad_text} | "
            f"ms per iteration {1000 * seconds_per_iteration:.1f} | tokens/s {tokens_per_second:.1f} | "
            f"TFLOP/s per device {tflops:.4g} | MFU {mfu_text} | peak memory {memory / 2**30:.2f} GiB"
        )
        self.print(line)
        if self.writer is not None:
            scalars = {"lm loss": mean_loss, "learning-rate": lr, "iteration-time": seconds_per_iteration,
                       "tokens-per-second": tokens_per_second, "tflops": tflops,
                       "mem-max-allocated-bytes": memory}
            if grad_norm is not None:
                scalars["grad-norm"] = grad_norm
            if mfu is not None:
                scalars["mfu"] = mfu
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, iteration)
            self.writer.flush()
        return line

    def validation(self, iteration: int, loss: float) -> Optional[str]:
        if not self.enabled:
            return None
        line = f"validation at iteration {iteration} | lm loss validation {loss:.6E}"
        self.print(line)
        if self.writer is not None:
            self.writer.add_scalar("lm loss validation", loss, iteration)
            self.writer.flush()
        return line

    def close(self):
        if self.writer is not None:
            self.writer.close()
