"""The model's one configuration object, its presets (the paper's Table 2) and validation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


def llama_ffn_hidden_size(hidden_size: int, multiple_of: int = 256) -> int:
    """The paper's SwiGLU width: 2/3 of 4·d, rounded up to a multiple of ``multiple_of``."""
    ffn = int(2 * 4 * hidden_size / 3)
    return multiple_of * ((ffn + multiple_of - 1) // multiple_of)


# dim, heads, layers of the paper's Table 2; "tiny" is ours, for tests and CPU demos.
_PRESETS = {
    "7b": dict(hidden_size=4096, num_attention_heads=32, num_layers=32),
    "13b": dict(hidden_size=5120, num_attention_heads=40, num_layers=40),
    "33b": dict(hidden_size=6656, num_attention_heads=52, num_layers=60),
    "65b": dict(hidden_size=8192, num_attention_heads=64, num_layers=80),
    "tiny": dict(hidden_size=256, num_attention_heads=4, num_layers=4, ffn_hidden_size=688,
                 vocab_size=8000, max_position_embeddings=512),
}


@dataclass
class LlamaConfig:
    """Shape and numerics of a LLaMA model; defaults are LLaMA-7B's."""

    num_layers: int = 32
    hidden_size: int = 4096
    num_attention_heads: int = 32
    ffn_hidden_size: int | None = None  # None: 8/3·hidden rounded up to a multiple of 256
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    norm_epsilon: float = 1e-6
    rope_theta: float = 10000.0
    init_method_std: float = 0.02
    sequence_parallel: bool = False
    # "full" recomputes each layer in backward; "selective" (Megatron's: recompute attention
    # scores) costs nothing here because the attention never stores its scores.
    recompute_granularity: str | None = None
    params_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = llama_ffn_hidden_size(self.hidden_size)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"LlamaConfig: num_attention_heads ({self.num_attention_heads}) must divide "
                f"hidden_size ({self.hidden_size})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim = hidden_size / num_attention_heads = "
                             f"{self.head_dim} must be even for rotary embeddings")
        if not self.norm_epsilon > 0:
            raise ValueError(f"LlamaConfig.norm_epsilon must be > 0, got {self.norm_epsilon}")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.recompute_granularity not in (None, "selective", "full"):
            raise ValueError(f"LlamaConfig.recompute_granularity must be None, 'selective' or 'full', "
                             f"got {self.recompute_granularity!r}")
        if self.params_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"LlamaConfig.params_dtype must be a floating dtype, got {self.params_dtype}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """The paper's shapes (``"7b" "13b" "33b" "65b"``) or ``"tiny"``; keywords override fields."""
        key = name.lower()
        if key not in _PRESETS:
            raise ValueError(f"unknown LLaMA preset {name!r}; choose one of {', '.join(_PRESETS)}")
        return cls(**{**_PRESETS[key], **overrides})

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "LlamaConfig":
        """From a ``transformers.LlamaConfig``; refuses features LLaMA-1 doesn't have."""
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        if kv_heads != hf_config.num_attention_heads:
            raise ValueError(f"grouped-query attention (num_key_value_heads={kv_heads} != "
                             f"num_attention_heads={hf_config.num_attention_heads}) is not LLaMA-1")
        if getattr(hf_config, "tie_word_embeddings", False):
            raise ValueError("tied input/output embeddings are not LLaMA: tie_word_embeddings must be False")
        if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
            raise ValueError("LLaMA has no biases: attention_bias and mlp_bias must be False")
        rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope scaling {rope.get('rope_type')!r} is not supported; LLaMA uses plain RoPE")
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        fields = dict(
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            num_attention_heads=hf_config.num_attention_heads,
            ffn_hidden_size=hf_config.intermediate_size,
            vocab_size=hf_config.vocab_size,
            max_position_embeddings=hf_config.max_position_embeddings,
            norm_epsilon=hf_config.rms_norm_eps,
            rope_theta=float(theta),
        )
        return cls(**{**fields, **overrides})

    def to_hf(self):
        """A ``transformers.LlamaConfig`` of the same shape (transformers must be installed)."""
        from transformers import LlamaConfig as HFLlamaConfig

        return HFLlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.norm_epsilon,
            rope_theta=self.rope_theta, tie_word_embeddings=False, hidden_act="silu",
            attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["params_dtype"] = str(self.params_dtype).removeprefix("torch.")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        d = dict(d)
        if isinstance(d.get("params_dtype"), str):
            d["params_dtype"] = getattr(torch, d["params_dtype"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_run_config(cls, run: dict) -> "LlamaConfig":
        """The model of a run configuration as checkpoints store it (``PretrainConfig.to_dict()``),
        also in the layout written before the run configuration held a ``LlamaConfig`` (no
        ``"version"`` key: the shape in ``model``, dtype and recomputation in ``training``)."""
        if run.get("version", 1) >= 2:
            return cls.from_dict(run["model"])
        shape = {k: v for k, v in run["model"].items() if k != "seq_length"}
        training, parallel = run.get("training", {}), run.get("parallel", {})
        return cls(**shape,
                   sequence_parallel=bool(parallel.get("sequence_parallel"))
                   and parallel.get("tensor_model_parallel_size", 1) > 1,
                   recompute_granularity=training.get("recompute_granularity"),
                   params_dtype=torch.bfloat16 if training.get("bf16") else torch.float32)

    def num_parameters(self, include_embedding: bool = True) -> int:
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        per_layer = 4 * h * h + 3 * h * f + 2 * h
        total = self.num_layers * per_layer + h + v * h  # + final norm + output head
        return total + (v * h if include_embedding else 0)
