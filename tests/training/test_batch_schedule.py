"""--rampup-batch-size: the global batch size of every iteration equals megatron-core's calculator's,
and the iteration count of a --train-samples run equals Megatron's."""
import warnings

import pytest

from megallama.training.batch_schedule import GlobalBatchSchedule

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core warns that Transformer Engine and Apex are absent
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

RAMPS = [(16, 16, 1000, 64), (8, 8, 1, 32), (4, 4, 10_000, 128), (32, 32, 333, 96), (2, 6, 150, 50)]


def megatron_sizes(start, increment, samples, global_batch, iterations):
    calculator = RampupBatchsizeNumMicroBatchesCalculator(global_batch, 1, 1, False, 1, start, increment, samples)
    consumed, sizes = 0, []
    for _ in range(iterations):
        calculator.update(consumed, consistency_check=True)
        sizes.append(calculator.get_current_global_batch_size())
        consumed += sizes[-1]
    return sizes


def megatron_train_iters(start, increment, samples, global_batch, train_samples):
    """Megatron's ``update_train_iters`` for a ramp, over megatron-core's calculator."""
    calculator = RampupBatchsizeNumMicroBatchesCalculator(global_batch, 1, 1, False, 1, start, increment, samples)
    iterations, consumed = 0, 0
    while consumed <= samples:
        calculator.update(consumed, consistency_check=False)
        consumed += calculator.get_current_global_batch_size()
        iterations += 1
    return iterations + (train_samples - consumed) // global_batch


@pytest.mark.parametrize("start,increment,samples,global_batch", RAMPS)
def test_sizes_match_megatron_core(start, increment, samples, global_batch):
    schedule = GlobalBatchSchedule.of(global_batch, [start, increment, samples])
    expected = megatron_sizes(start, increment, samples, global_batch, 400)
    consumed, ours = 0, []
    for _ in range(400):
        ours.append(schedule.size_at(consumed))
        consumed += ours[-1]
    assert ours == expected
    assert set(ours) <= set(schedule.sizes()) and ours[-1] == global_batch
    for k in (0, 1, 7, 50, 399):
        assert schedule.consumed_after(k) == sum(ours[:k])
        assert schedule.consumed_after(400 - k, sum(ours[:k])) == sum(ours)


@pytest.mark.parametrize("start,increment,samples,global_batch", RAMPS)
def test_train_iterations_match_megatron(start, increment, samples, global_batch):
    schedule = GlobalBatchSchedule.of(global_batch, [start, increment, samples])
    for train_samples in (samples + 2 * global_batch, samples + 1000 * global_batch + 17, 10 ** 6):
        assert schedule.iterations_for(train_samples) == megatron_train_iters(start, increment, samples,
                                                                              global_batch, train_samples)
    # Shorter than the ramp: the iterations whose batches fit (Megatron's count would go negative).
    short = GlobalBatchSchedule.of(64, [16, 16, 1000])
    assert short.iterations_for(100) == 6 and short.consumed_after(6) == 96


def test_constant_schedule():
    for rampup in (None, [], [64, 16, 500]):
        schedule = GlobalBatchSchedule.of(64, rampup)
        assert schedule.rampup is None and schedule.sizes() == [64]
        assert schedule.size_at(12345) == 64 and schedule.consumed_after(3, 10) == 202
        assert schedule.iterations_for(1000) == 15


@pytest.mark.parametrize("rampup,message", [
    ([16, 16], "START INCREMENT SAMPLES"),
    ([0, 16, 100], "at least 1"),
    ([16, 16, 0], "at least 1"),
    ([80, 16, 100], "whole increments"),
    ([16, 20, 100], "whole increments"),
])
def test_bad_ramps_are_refused(rampup, message):
    with pytest.raises(ValueError, match=message):
        GlobalBatchSchedule.of(64, rampup)
