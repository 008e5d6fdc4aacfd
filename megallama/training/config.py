"""The pretraining run's configuration: one object built from the flags and passed down.

Each group of flags is a dataclass with Megatron's flag names as field names (``--lr-decay-style``
→ ``lr_decay_style``), so a field is found by grepping for its flag. The model is the model's own
``LlamaConfig`` and the optimizer the optimizer's own ``OptimizerConfig``. ``PretrainConfig`` holds
the groups and round-trips through a plain dict (stored in every checkpoint).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from megallama.config import LlamaConfig
from megallama.distributed.optimizer import OptimizerConfig
from megallama.pipeline.stages import virtual_size_from_layers_per_stage
from megallama.training.batch_schedule import GlobalBatchSchedule

# The paper's peak learning rate per model size (Table 2); the shapes are LlamaConfig's presets.
PAPER_PEAK_LR = {"7b": 3.0e-4, "13b": 3.0e-4, "33b": 1.5e-4, "65b": 1.5e-4}


@dataclass
class ParallelArgs:
    """How the model and the batch are split over the ranks."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    overlap_p2p_comm: bool = True  # interleaved schedule: exchanges between stages overlap compute
    world_size: int = 1  # filled from the launcher's WORLD_SIZE when the flags are parsed
    distributed_backend: Optional[str] = None  # None: nccl with CUDA, else gloo
    distributed_timeout_minutes: int = 10

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    def virtual_pipeline_model_parallel_size(self, num_layers: int) -> Optional[int]:
        """Model chunks per pipeline rank for the interleaved schedule, None without interleaving."""
        return virtual_size_from_layers_per_stage(num_layers, self.pipeline_model_parallel_size,
                                                  self.num_layers_per_virtual_pipeline_stage)


@dataclass
class LRScheduleArgs:
    """Learning rate: linear warmup to the optimizer's ``lr``, then decay to ``min_lr``.

    Lengths are in iterations (``lr_*_iters``) or, for a run trained by samples, in samples
    (``lr_*_samples``, which win when set); ``lr_warmup_fraction`` (when set) makes the warmup that
    fraction of the decay length, as Megatron's ``--lr-warmup-fraction``.
    """

    min_lr: float = 3.0e-5
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 2000
    lr_decay_iters: int = 0
    lr_warmup_samples: Optional[int] = None
    lr_decay_samples: Optional[int] = None
    lr_warmup_fraction: Optional[float] = None

    def warmup_and_decay_samples(self, global_batch_size: int) -> tuple[float, int]:
        """(warmup, decay) lengths in samples, as Megatron's ``OptimizerParamScheduler`` counts them
        (it steps by the global batch size each iteration, whether the run counts iterations or samples)."""
        decay = self.lr_decay_samples if self.lr_decay_samples is not None else self.lr_decay_iters * global_batch_size
        if self.lr_warmup_fraction is not None:
            return self.lr_warmup_fraction * decay, decay
        if self.lr_warmup_samples is not None:
            return self.lr_warmup_samples, decay
        return self.lr_warmup_iters * global_batch_size, decay


@dataclass
class TrainingArgs:
    """Batch, sequence length and length of the run."""

    micro_batch_size: int = 1
    global_batch_size: int = 1
    seq_length: int = 2048
    train_iters: int = 0
    rampup_batch_size: Optional[list] = None  # [start, increment, ramp-up samples] (batch_schedule.py)
    seed: int = 1234
    eval_interval: int = 1000
    eval_iters: int = 100
    exit_signal_handler: bool = False  # the flag's default (on with --save) is resolved by arguments.py
    exit_duration_in_mins: Optional[float] = None
    exit_interval: Optional[int] = None
    # --manual-gc: the trainer collects Python garbage itself, every manual_gc_interval iterations
    # (0: only around validation), instead of the collector pausing at random points on some rank.
    manual_gc: bool = False
    manual_gc_interval: int = 0
    num_workers: int = 0  # threads preparing the next global batch during the current iteration
    attention_backend: str = "auto"  # torch SDPA kernels allowed (see arguments_model.ATTENTION_BACKENDS)
    profile: bool = False  # iterations [profile_step_start, profile_step_end) marked or recorded (profiling.py)
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: list = field(default_factory=lambda: [0])
    use_pytorch_profiler: bool = False


@dataclass
class DataArgs:
    """Where the tokens come from."""

    data_path: list = field(default_factory=list)
    split: str = "969,30,1"
    # Separate blends per split (Megatron's --train-data-path ...), instead of --split of data_path.
    train_data_path: list = field(default_factory=list)
    valid_data_path: list = field(default_factory=list)
    test_data_path: list = field(default_factory=list)
    mock_data: bool = False
    tokenizer_type: str = "NullTokenizer"
    tokenizer_model: Optional[str] = None
    data_cache_path: Optional[str] = None
    sft_data_path: list = field(default_factory=list)  # packed instruction data (preprocess_instructions)
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    # Megatron's --make-vocab-size-divisible-by: embedding rows padded to a multiple of this × TP
    # (None: no padding beyond what the tokenizer or --vocab-size gives).
    make_vocab_size_divisible_by: Optional[int] = None

    @property
    def separate_split_paths(self) -> bool:
        return bool(self.train_data_path or self.valid_data_path or self.test_data_path)


@dataclass
class CheckpointArgs:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    ckpt_step: Optional[int] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False
    no_save_rng: bool = False
    allow_no_checkpoint: bool = False
    exit_on_missing_checkpoint: bool = False
    rewind_save: bool = False
    finetune: bool = False
    # Which lr schedule a resume runs where the checkpoint's differs from the flags' (resumed_schedule.py).
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False


@dataclass
class LoggingArgs:
    log_interval: int = 100
    tensorboard_dir: Optional[str] = None
    peak_tflops: Optional[float] = None
    # Megatron's optional TensorBoard scalars (TrainingLogger says which tags each adds).
    log_throughput: bool = False
    log_timers_to_tensorboard: bool = False
    log_memory_to_tensorboard: bool = False
    log_validation_ppl_to_tensorboard: bool = False
    log_params_norm: bool = False
    wandb_project: Optional[str] = None  # None or "": no Weights & Biases logging
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None


# Groups of the stored dict besides "model", in their order.
_GROUPS = {"parallel": ParallelArgs, "optimizer": OptimizerConfig, "lr_schedule": LRScheduleArgs,
           "training": TrainingArgs, "data": DataArgs, "checkpoint": CheckpointArgs, "logging": LoggingArgs}
# 2: the model is a LlamaConfig and the optimizer an OptimizerConfig. Before, with no "version" key:
# the shape and seq_length in "model", its dtype and recomputation in "training", sequence_parallel
# and use_distributed_optimizer in "parallel", the peak lr in "lr_schedule".
STORED_VERSION = 2


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; built by ``arguments.parse_args`` and passed down."""

    model: LlamaConfig = field(default_factory=LlamaConfig)
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleArgs = field(default_factory=LRScheduleArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    data: DataArgs = field(default_factory=DataArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)

    @property
    def tokens_per_iteration(self) -> int:
        return self.training.global_batch_size * self.training.seq_length

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches each data-parallel rank runs per iteration at the full global batch size."""
        return self.num_micro_batches_of(self.training.global_batch_size)

    def num_micro_batches_of(self, global_batch_size: int) -> int:
        """Micro-batches each data-parallel rank runs in an iteration of ``global_batch_size`` sequences."""
        return global_batch_size // (self.training.micro_batch_size * self.parallel.data_parallel_size)

    @property
    def batch_schedule(self) -> GlobalBatchSchedule:
        """The global batch size of each iteration (constant unless ``--rampup-batch-size``)."""
        return GlobalBatchSchedule.of(self.training.global_batch_size, self.training.rampup_batch_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of str/int/float/bool/None/list (safe for ``torch.load(weights_only=True)``)."""
        return {"version": STORED_VERSION, "model": self.model.to_dict(),
                **{name: dataclasses.asdict(getattr(self, name)) for name in _GROUPS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PretrainConfig":
        """``to_dict()``'s layout, also partial (a missing group or field takes its default), or the
        layout checkpoints stored before version 2."""
        groups = {name: dict(d.get(name) or {}) for name in _GROUPS}
        if d.get("version", 1) < STORED_VERSION:
            _upgrade_version_1(d, groups)
        model = LlamaConfig.from_run_config(d) if "model" in d else LlamaConfig()
        return cls(model=model, **{name: _GROUPS[name](**fields) for name, fields in groups.items()})


def _upgrade_version_1(d: dict[str, Any], groups: dict[str, dict]) -> None:
    """Move the fields of a stored version-1 dict to their version-2 groups (``LlamaConfig.from_run_config``
    reads its model); drop those that now live in the model."""
    groups["training"]["seq_length"] = d.get("model", {}).get("seq_length", TrainingArgs.seq_length)
    for name in ("bf16", "recompute_granularity"):
        groups["training"].pop(name, None)
    groups["parallel"].pop("sequence_parallel", None)
    if "use_distributed_optimizer" in groups["parallel"]:
        groups["optimizer"]["use_distributed_optimizer"] = groups["parallel"].pop("use_distributed_optimizer")
    if "lr" in groups["lr_schedule"]:
        groups["optimizer"]["lr"] = groups["lr_schedule"].pop("lr")
