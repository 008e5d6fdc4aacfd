"""What a plan is about: the workload (model, sequence, batch, precision) and one parallel layout."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from megallama.config import LlamaConfig

RECOMPUTE_CHOICES = ("none", "selective", "full")


@dataclass(frozen=True)
class Workload:
    """The model and the batch every layout must train: ``global_batch_size`` sequences of
    ``seq_length`` tokens per optimizer step, bf16 (or fp32) weights and activations, weight
    gradients added into the fp32 buffer by their GEMMs (the trainer's default) or made first."""

    model: LlamaConfig
    seq_length: int = 2048
    global_batch_size: int = 2048
    bf16: bool = True
    gradient_accumulation_fusion: bool = True

    @property
    def act_bytes(self) -> int:
        return 2 if self.bf16 else 4

    @property
    def tokens_per_step(self) -> int:
        return self.seq_length * self.global_batch_size


@dataclass(frozen=True)
class Layout:
    """One way to split a run over ``tp × pp × dp`` devices.

    ``virtual``: model chunks per pipeline rank (1 = plain 1F1B). ``recompute``: "full"
    recomputes whole layers in backward; "selective" (Megatron's: recompute attention scores) is
    the same as "none" here, the attention never stores its scores.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    virtual: int = 1
    sequence_parallel: bool = False
    recompute: str = "none"
    distributed_optimizer: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def full_recompute(self) -> bool:
        return self.recompute == "full"

    def micro_batches(self, workload: Workload) -> int:
        """Micro-batches each data-parallel rank runs per step."""
        return workload.global_batch_size // (self.micro_batch_size * self.dp)

    def problems(self, workload: Workload) -> list[str]:
        """Why this layout cannot run ``workload`` (the trainer's own checks); empty if it can."""
        m = workload.model
        out = []
        if self.recompute not in RECOMPUTE_CHOICES:
            out.append(f"recompute must be one of {RECOMPUTE_CHOICES}, got {self.recompute!r}")
        if m.num_attention_heads % self.tp or m.ffn_hidden_size % self.tp:
            out.append(f"TP={self.tp} does not divide {m.num_attention_heads} heads and FFN {m.ffn_hidden_size}")
        elif m.num_query_groups % self.tp and self.tp % m.num_query_groups:
            out.append(f"TP={self.tp} and the {m.num_query_groups} key/value heads do not divide one another")
        if m.num_layers % (self.pp * self.virtual):
            out.append(f"PP={self.pp} × virtual={self.virtual} does not divide {m.num_layers} layers")
        if self.virtual > 1 and self.pp < 2:
            out.append("interleaving (virtual > 1) needs PP ≥ 2")
        if workload.global_batch_size % (self.micro_batch_size * self.dp):
            out.append(f"global batch {workload.global_batch_size} is not a multiple of micro-batch "
                       f"{self.micro_batch_size} × DP {self.dp}")
        elif self.virtual > 1 and self.micro_batches(workload) % self.pp:
            out.append(f"interleaving needs the {self.micro_batches(workload)} micro-batches to be a "
                       f"multiple of PP={self.pp}")
        if self.sequence_parallel and (self.tp < 2 or workload.seq_length % self.tp):
            out.append(f"sequence parallelism needs TP ≥ 2 dividing the sequence ({workload.seq_length})")
        return out

    def describe(self) -> str:
        parts = [f"TP={self.tp}", f"PP={self.pp}", f"DP={self.dp}", f"mb={self.micro_batch_size}"]
        if self.virtual > 1:
            parts.append(f"v={self.virtual}")
        if self.sequence_parallel:
            parts.append("SP")
        if self.full_recompute:
            parts.append("recompute=full")
        if self.distributed_optimizer:
            parts.append("dist-opt")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)
