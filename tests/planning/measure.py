"""Peak bytes the trainer allocates on each rank, read from the profiler's allocation records."""
from torch.profiler import ProfilerActivity, profile

from megallama.parallel import state
from megallama.training.arguments import parse_args
from megallama.training.loop import Trainer


def _is_allocation_record(event) -> bool:
    try:
        return event.name() == "[memory]"
    except UnicodeDecodeError:  # some recorded op names are not valid UTF-8; none is an allocation
        return False


class AllocationCounter:
    """Live bytes of this process's CPU allocator, followed across profiled windows: every
    allocation and free inside a window is a profiler record, summed in time order."""

    def __init__(self):
        self.live = 0

    def peak_during(self, fn) -> int:
        """Largest live total while ``fn()`` runs (counting what earlier windows left allocated)."""
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                         if _is_allocation_record(e))
        peak = self.live
        for _, nbytes in records:
            self.live += nbytes
            peak = max(peak, self.live)
        return peak


def train_and_measure(flags: list, world_size: int) -> dict:
    """Build the trainer for ``flags`` and run it one iteration per profiled window: this rank's
    pipeline rank and, per iteration, (live bytes when it starts, its peak)."""
    config = parse_args(flags, env={"WORLD_SIZE": str(world_size)}, check_files=False)
    counter = AllocationCounter()
    trainer = []
    counter.peak_during(lambda: trainer.append(Trainer(config, print_fn=lambda *a: None)))
    iterations = []
    for iteration in range(1, config.training.train_iters + 1):
        config.training.train_iters = iteration
        start = counter.live
        iterations.append((start, counter.peak_during(trainer[0].train)))
    return {"iterations": iterations, "pipeline_rank": state.get_pipeline_model_parallel_rank()}
