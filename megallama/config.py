"""The model's one configuration object, its presets (the paper's Table 2, LLaMA-2, LLaMA-3) and validation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from megallama.rope import RopeScaling

__all__ = ["LlamaConfig", "RopeScaling", "llama_ffn_hidden_size"]


def llama_ffn_hidden_size(hidden_size: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU width: 2/3 of 4·d, times ``ffn_dim_multiplier`` when given (LLaMA-2 70B,
    LLaMA-3), rounded up to a multiple of ``multiple_of``."""
    ffn = int(2 * 4 * hidden_size / 3)
    if ffn_dim_multiplier is not None:
        ffn = int(ffn_dim_multiplier * ffn)
    return multiple_of * ((ffn + multiple_of - 1) // multiple_of)


_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, norm_epsilon=1e-5)
_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, norm_epsilon=1e-5, rope_theta=500000.0,
               num_query_groups=8)
_LLAMA3_2 = dict(_LLAMA3, max_position_embeddings=131072, tie_word_embeddings=True,
                 rope_scaling=RopeScaling(factor=32.0))

# dim, heads, layers of the paper's Table 2; "tiny" is ours, for tests and CPU demos. LLaMA-2/3:
# the released params.json shapes, FFN widths as Meta's code derives them (multiple_of, ffn_dim_multiplier).
_PRESETS = {
    "7b": dict(hidden_size=4096, num_attention_heads=32, num_layers=32),
    "13b": dict(hidden_size=5120, num_attention_heads=40, num_layers=40),
    "33b": dict(hidden_size=6656, num_attention_heads=52, num_layers=60),
    "65b": dict(hidden_size=8192, num_attention_heads=64, num_layers=80),
    "llama2-7b": dict(hidden_size=4096, num_attention_heads=32, num_layers=32, ffn_hidden_size=11008, **_LLAMA2),
    "llama2-13b": dict(hidden_size=5120, num_attention_heads=40, num_layers=40, ffn_hidden_size=13824, **_LLAMA2),
    "llama2-70b": dict(hidden_size=8192, num_attention_heads=64, num_layers=80, ffn_hidden_size=28672,
                       num_query_groups=8, **_LLAMA2),
    "llama3-8b": dict(hidden_size=4096, num_attention_heads=32, num_layers=32, ffn_hidden_size=14336, **_LLAMA3),
    "llama3-70b": dict(hidden_size=8192, num_attention_heads=64, num_layers=80, ffn_hidden_size=28672, **_LLAMA3),
    "llama3.2-1b": dict(hidden_size=2048, num_attention_heads=32, num_layers=16, ffn_hidden_size=8192, **_LLAMA3_2),
    "llama3.2-3b": dict(hidden_size=3072, num_attention_heads=24, num_layers=28, ffn_hidden_size=8192, **_LLAMA3_2),
    "tiny": dict(hidden_size=256, num_attention_heads=4, num_layers=4, ffn_hidden_size=688,
                 vocab_size=8000, max_position_embeddings=512),
}


class _Derived(int):
    """An int ``LlamaConfig.__post_init__`` derived from the shape rather than one it was given.

    ``dataclasses.replace`` passes every field back to ``__init__``; a value so marked is derived
    again from the new shape instead of being kept stale. Copies and pickles are plain ints (stored
    configs stay ``torch.load(weights_only=True)``-safe), so they count as given.
    """

    def __reduce__(self):
        return int, (int(self),)


@dataclass
class LlamaConfig:
    """Shape and numerics of a LLaMA model; defaults are LLaMA-7B's."""

    num_layers: int = 32
    hidden_size: int = 4096
    num_attention_heads: int = 32
    # Grouped-query attention: key/value heads (HF num_key_value_heads, Meta n_kv_heads), each
    # shared by num_attention_heads / num_query_groups query heads. None: one per query head.
    # __post_init__ turns the None defaults of these two and ffn_hidden_size into ints marked as
    # derived, so dataclasses.replace of hidden_size or num_attention_heads derives them again.
    num_query_groups: int | None = None
    kv_channels: int | None = None  # size of each head (HF head_dim); None: hidden_size / num_attention_heads
    ffn_hidden_size: int | None = None  # None: 8/3·hidden rounded up to a multiple of 256
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    norm_epsilon: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # LLaMA-3.1's long-context frequency scaling
    tie_word_embeddings: bool = False  # the output head is the input embedding (LLaMA-3.2 1B/3B)
    init_method_std: float = 0.02
    sequence_parallel: bool = False
    # "full" recomputes each layer in backward; "selective" (Megatron's: recompute attention
    # scores) costs nothing here because the attention never stores its scores.
    recompute_granularity: str | None = None
    params_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        for name in ("ffn_hidden_size", "num_query_groups", "kv_channels"):
            if isinstance(getattr(self, name), _Derived):  # a copy's stale derivation (dataclasses.replace)
                setattr(self, name, None)
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = _Derived(llama_ffn_hidden_size(self.hidden_size))
        if self.num_query_groups is None:
            self.num_query_groups = _Derived(self.num_attention_heads)
        given_kv_channels = () if self.kv_channels is None else ("kv_channels",)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", *given_kv_channels,
                     "ffn_hidden_size", "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"LlamaConfig: num_query_groups ({self.num_query_groups}) must divide "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"LlamaConfig: num_attention_heads ({self.num_attention_heads}) must divide "
                    f"hidden_size ({self.hidden_size}) unless kv_channels is given")
            self.kv_channels = _Derived(self.hidden_size // self.num_attention_heads)
        if self.kv_channels % 2:
            raise ValueError(f"LlamaConfig: the head size kv_channels = {self.kv_channels} must be even "
                             "for rotary embeddings")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"LlamaConfig.rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"LlamaConfig.tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}")
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
        return self.kv_channels

    def check_parallel_layout(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              virtual_pipeline_model_parallel_size: int | None = None) -> None:
        """Raises ValueError unless the model splits evenly: each layer's heads and FFN columns over
        the tensor-parallel ranks (key/value heads replicated where there are fewer than ranks), the
        layer stack into pipeline stages of equal model chunks (``virtual_pipeline_model_parallel_size``
        per stage). Messages use Megatron's names, which are
        the flags' (``megallama.training.arguments`` words them as flags)."""
        tp, pp, v = tensor_model_parallel_size, pipeline_model_parallel_size, virtual_pipeline_model_parallel_size
        for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                            ("virtual_pipeline_model_parallel_size", 1 if v is None else v)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name in ("num_attention_heads", "ffn_hidden_size"):
            if getattr(self, name) % tp:
                raise ValueError(f"{name} ({getattr(self, name)}) is not divisible by "
                                 f"tensor_model_parallel_size ({tp})")
        groups = self.num_query_groups
        if groups % tp and tp % groups:  # fewer key/value heads than ranks: each one on tp / groups ranks
            raise ValueError(f"num_query_groups ({groups}) and tensor_model_parallel_size ({tp}) "
                             "must divide one another")
        chunks = pp * (v or 1)
        if self.num_layers % chunks:
            what = f" × virtual_pipeline_model_parallel_size ({v}) = {chunks}" if v else ""
            raise ValueError(f"num_layers ({self.num_layers}) is not divisible by "
                             f"pipeline_model_parallel_size ({pp}){what}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """The paper's shapes (``"7b" "13b" "33b" "65b"``), LLaMA-2's (``"llama2-7b"`` …), LLaMA-3's
        (``"llama3-8b" "llama3-70b" "llama3.2-1b" "llama3.2-3b"``) or ``"tiny"``; keywords override fields."""
        key = name.lower()
        if key not in _PRESETS:
            raise ValueError(f"unknown LLaMA preset {name!r}; choose one of {', '.join(_PRESETS)}")
        return cls(**{**_PRESETS[key], **overrides})

    @classmethod
    def from_hf(cls, hf_config: Any, **overrides: Any) -> "LlamaConfig":
        """From a ``transformers.LlamaConfig``; refuses what megallama's model doesn't have (biases,
        rope types other than plain and LLaMA-3.1's)."""
        if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
            raise ValueError("LLaMA has no biases: attention_bias and mlp_bias must be False")
        # transformers 5 names it rope_parameters (theta included); 4.x rope_scaling beside rope_theta
        rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope_type {rope_type!r} is not supported; megallama knows 'default' and 'llama3'")
        scaling = None if rope_type == "default" else RopeScaling(
            factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
        theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        fields = dict(
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            num_attention_heads=hf_config.num_attention_heads,
            num_query_groups=getattr(hf_config, "num_key_value_heads", None),
            kv_channels=getattr(hf_config, "head_dim", None),
            ffn_hidden_size=hf_config.intermediate_size,
            vocab_size=hf_config.vocab_size,
            max_position_embeddings=hf_config.max_position_embeddings,
            norm_epsilon=hf_config.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        )
        return cls(**{**fields, **overrides})

    def to_hf(self):
        """A ``transformers.LlamaConfig`` of the same shape (transformers must be installed)."""
        from transformers import LlamaConfig as HFLlamaConfig

        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**rope, "rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return HFLlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_query_groups,
            head_dim=self.kv_channels, max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_epsilon, rope_parameters=rope, tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu", attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2,
        )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)  # rope_scaling becomes a plain dict
        d["params_dtype"] = str(self.params_dtype).removeprefix("torch.")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """From :meth:`to_dict`'s form; dicts stored before a field existed take its default."""
        d = dict(d)
        if isinstance(d.get("params_dtype"), str):
            d["params_dtype"] = getattr(torch, d["params_dtype"])
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
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
        """All parameters; ``include_embedding=False`` leaves out the input embedding, unless it is
        tied: then it is the output head, which is counted."""
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.vocab_size
        q, kv = self.num_attention_heads * self.kv_channels, self.num_query_groups * self.kv_channels
        per_layer = h * (2 * q + 2 * kv) + 3 * h * f + 2 * h  # wq and wo, wk and wv, the FFN, two norms
        total = self.num_layers * per_layer + h + v * h  # + final norm + output head
        return total + (v * h if include_embedding and not self.tie_word_embeddings else 0)
