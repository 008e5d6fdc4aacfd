"""The global batch size of each iteration: constant, or growing (Megatron's ``--rampup-batch-size``).

``--rampup-batch-size START INCREMENT SAMPLES`` starts at ``START`` sequences per iteration and
adds ``INCREMENT`` every ``SAMPLES / ((GLOBAL - START) / INCREMENT)`` consumed samples until it
reaches ``--global-batch-size`` (GPT-3's ramp). The size is a function of the samples consumed
before the iteration, as in megatron-core's ``RampupBatchsizeNumMicroBatchesCalculator``, so a
resumed run (which stores its consumed samples) continues on the same ramp, and the global batch
of an iteration is samples ``[consumed, consumed + size)`` of the dataset whatever the layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class GlobalBatchSchedule:
    global_batch_size: int
    rampup: Optional[tuple[int, int, int]] = None  # (start, increment, ramp-up samples)

    @classmethod
    def of(cls, global_batch_size: int, rampup: Optional[Sequence[int]]) -> "GlobalBatchSchedule":
        """Checked: the ramp's sizes are whole increments from ``start`` up to the global batch size."""
        if not rampup:
            return cls(global_batch_size)
        if len(rampup) != 3:
            raise ValueError(f"--rampup-batch-size takes START INCREMENT SAMPLES, got {list(rampup)}")
        start, increment, samples = (int(v) for v in rampup)
        if min(start, increment, samples) < 1:
            raise ValueError(f"--rampup-batch-size {start} {increment} {samples}: the start, the increment and "
                             "the ramp-up samples must be at least 1")
        if start > global_batch_size or (global_batch_size - start) % increment:
            raise ValueError(f"--rampup-batch-size {start} {increment} {samples}: the start must reach "
                             f"--global-batch-size {global_batch_size} in whole increments of {increment}")
        if start == global_batch_size:  # no increments: a constant batch (megatron-core divides by zero)
            return cls(global_batch_size)
        return cls(global_batch_size, (start, increment, samples))

    def sizes(self) -> list[int]:
        """Every global batch size the run will use."""
        if self.rampup is None:
            return [self.global_batch_size]
        start, increment, _ = self.rampup
        return list(range(start, self.global_batch_size + 1, increment))

    def size_at(self, consumed_samples: int) -> int:
        """The global batch size of the iteration that starts after ``consumed_samples`` samples."""
        if self.rampup is None:
            return self.global_batch_size
        start, increment, samples = self.rampup
        if consumed_samples > samples:
            return self.global_batch_size
        samples_per_increment = samples / ((self.global_batch_size - start) // increment)
        return start + int(consumed_samples / samples_per_increment) * increment

    def consumed_after(self, iterations: int, consumed_samples: int = 0) -> int:
        """Samples consumed after ``iterations`` more iterations from ``consumed_samples``."""
        while iterations > 0 and self.rampup is not None and consumed_samples <= self.rampup[2]:
            consumed_samples += self.size_at(consumed_samples)
            iterations -= 1
        return consumed_samples + iterations * self.global_batch_size

    def iterations_for(self, train_samples: int) -> int:
        """Iterations of a run of ``--train-samples``: Megatron's count (the ramp's iterations, then
        whole global batches; a partial last batch is dropped), except that a run shorter than the
        ramp stops before the first batch that would pass ``train_samples`` (Megatron's count goes
        negative there)."""
        iterations, consumed = 0, 0
        while self.rampup is not None and consumed <= self.rampup[2] \
                and consumed + self.size_at(consumed) <= train_samples:
            consumed += self.size_at(consumed)
            iterations += 1
        return iterations + max(0, train_samples - consumed) // self.global_batch_size
