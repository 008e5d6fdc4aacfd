"""Data parallelism (bucketed, overlapped gradient reduction), ZeRO-1 optimizer, gradient clipping."""
from megallama.distributed.clip_grads import clip_grads_, counts_for_norm, global_grad_norm
from megallama.distributed.data_parallel import (
    DistributedDataParallel,
    finalize_model_grads,
    global_loss_sums,
    global_mean_loss,
)
from megallama.distributed.optimizer import (
    DistributedOptimizer,
    MixedPrecisionOptimizer,
    OptimizerConfig,
    build_optimizer,
)

__all__ = [
    "DistributedDataParallel", "DistributedOptimizer", "MixedPrecisionOptimizer", "OptimizerConfig",
    "build_optimizer", "clip_grads_", "counts_for_norm", "finalize_model_grads", "global_grad_norm",
    "global_loss_sums", "global_mean_loss",
]
