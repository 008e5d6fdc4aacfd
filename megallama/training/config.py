"""The pretraining run's configuration: one object built from the flags and passed down.

Each group of flags is a dataclass with Megatron's flag names as field names (``--lr-decay-style``
→ ``lr_decay_style``), so a field is found by grepping for its flag. ``PretrainConfig`` holds the
groups and round-trips through a plain dict (stored in every checkpoint).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

# The paper's peak learning rate per model size (Table 2); the shapes are LlamaConfig's presets.
PAPER_PEAK_LR = {"7b": 3.0e-4, "13b": 3.0e-4, "33b": 1.5e-4, "65b": 1.5e-4}


@dataclass
class ModelArgs:
    """Shape of the network (``--num-layers`` … ``--vocab-size``)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    seq_length: int = 2048
    max_position_embeddings: int = 2048
    norm_epsilon: float = 1e-6
    vocab_size: int = 32000
    init_method_std: float = 0.02
    rope_theta: float = 10000.0


@dataclass
class ParallelArgs:
    """How the model and the batch are split over the ranks."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    world_size: int = 1  # filled from the launcher's WORLD_SIZE when the flags are parsed
    distributed_backend: Optional[str] = None  # None: nccl with CUDA, else gloo
    distributed_timeout_minutes: int = 10

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    def virtual_pipeline_model_parallel_size(self, num_layers: int) -> Optional[int]:
        """Model chunks per pipeline rank for the interleaved schedule, None without interleaving."""
        if self.num_layers_per_virtual_pipeline_stage is None:
            return None
        return num_layers // (self.pipeline_model_parallel_size * self.num_layers_per_virtual_pipeline_stage)


@dataclass
class OptimizerArgs:
    """AdamW and gradient clipping (paper: β = (0.9, 0.95), weight decay 0.1, clip 1.0)."""

    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class LRScheduleArgs:
    """Learning rate: linear warmup, then decay to ``min_lr`` over ``lr_decay_iters``."""

    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 2000
    lr_decay_iters: int = 0


@dataclass
class TrainingArgs:
    """Batch, length of the run, precision and recomputation."""

    micro_batch_size: int = 1
    global_batch_size: int = 1
    train_iters: int = 0
    seed: int = 1234
    bf16: bool = False
    recompute_granularity: Optional[str] = None
    eval_interval: int = 1000
    eval_iters: int = 100
    exit_signal_handler: bool = False  # the flag's default (on with --save) is resolved by arguments.py
    exit_duration_in_mins: Optional[float] = None
    exit_interval: Optional[int] = None


@dataclass
class DataArgs:
    """Where the tokens come from."""

    data_path: list = field(default_factory=list)
    split: str = "969,30,1"
    mock_data: bool = False
    tokenizer_type: str = "NullTokenizer"
    tokenizer_model: Optional[str] = None
    data_cache_path: Optional[str] = None
    sft_data_path: list = field(default_factory=list)  # packed instruction data (preprocess_instructions)
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


@dataclass
class CheckpointArgs:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    ckpt_step: Optional[int] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    allow_no_checkpoint: bool = False
    rewind_save: bool = False
    finetune: bool = False


@dataclass
class LoggingArgs:
    log_interval: int = 100
    tensorboard_dir: Optional[str] = None
    peak_tflops: Optional[float] = None


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs; built by ``arguments.parse_args`` and passed down."""

    model: ModelArgs
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    optimizer: OptimizerArgs = field(default_factory=OptimizerArgs)
    lr_schedule: LRScheduleArgs = field(default_factory=LRScheduleArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    data: DataArgs = field(default_factory=DataArgs)
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    logging: LoggingArgs = field(default_factory=LoggingArgs)

    @property
    def tokens_per_iteration(self) -> int:
        return self.training.global_batch_size * self.model.seq_length

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches each data-parallel rank runs per iteration."""
        return self.training.global_batch_size // (
            self.training.micro_batch_size * self.parallel.data_parallel_size
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of str/int/float/bool/None/list (safe for ``torch.load(weights_only=True)``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PretrainConfig":
        types = {
            "model": ModelArgs, "parallel": ParallelArgs, "optimizer": OptimizerArgs,
            "lr_schedule": LRScheduleArgs, "training": TrainingArgs, "data": DataArgs,
            "checkpoint": CheckpointArgs, "logging": LoggingArgs,
        }
        return cls(**{name: types[name](**d[name]) for name in types})
