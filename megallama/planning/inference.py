"""What serving each model size costs, beside what the paper reports it scores.

The paper (§1) picks sizes for the cost of inference at a given quality. Per size: bf16 weights
plus the KV cache (``2 · layers · key/value heads · head size`` values per token of context) at a
batch and context; the GPUs needed to hold them (tensor parallelism within a node); decode tokens/s
from memory bandwidth — each decode step reads every weight and the whole cache once, so
``batch / ((weights + cache) / (GPUs · HBM bandwidth))`` is the ceiling a memory-bound decoder
reaches; and the FLOPs per generated token (``2`` per weight outside the embedding lookup, plus
``4 · heads · head size`` per layer and token of context for the attention scores and the
weighted sum).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from megallama.config import LlamaConfig
from megallama.planning.hardware import GpuSpec

# Zero-shot HellaSwag accuracy (Table 3) and 64-shot NaturalQuestions exact match (Table 4).
PAPER_QUALITY = {
    "7b": {"hellaswag": 76.1, "naturalquestions_64shot": 26.1},
    "13b": {"hellaswag": 79.2, "naturalquestions_64shot": 31.9},
    "33b": {"hellaswag": 82.8, "naturalquestions_64shot": 36.0},
    "65b": {"hellaswag": 84.2, "naturalquestions_64shot": 39.9},
}


@dataclass
class InferenceCost:
    model_size: str
    parameters: int
    weights_gb: float
    kv_cache_gb: float
    gpus: int
    decode_tokens_per_s: float
    gflops_per_token: float
    hellaswag: float | None
    naturalquestions_64shot: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def kv_cache_bytes(model: LlamaConfig, batch: int, context: int, bytes_per_value: int = 2) -> float:
    return 2 * model.num_layers * model.num_query_groups * model.kv_channels * bytes_per_value * batch * context


def inference_cost(size: str, model: LlamaConfig, gpu: GpuSpec, batch: int, context: int,
                   reserve: float) -> InferenceCost:
    weights = 2.0 * model.num_parameters()
    cache = kv_cache_bytes(model, batch, context)
    usable = gpu.memory_bytes * (1 - reserve)
    gpus = 1
    while gpus <= gpu.gpus_per_node and (weights + cache) / gpus > usable:
        gpus *= 2
    if gpus > gpu.gpus_per_node:
        raise ValueError(f"{size} with batch {batch} × context {context} needs "
                         f"{(weights + cache) / 1e9:.0f} GB: more than one node of {gpu.name}")
    decode = batch / ((weights + cache) / (gpus * gpu.hbm_gb_s * 1e9))
    matmul_weights = model.num_parameters(include_embedding=False)
    flops = 2 * matmul_weights + 4 * model.num_layers * model.num_attention_heads * model.kv_channels * context
    quality = PAPER_QUALITY.get(size, {})
    return InferenceCost(size, model.num_parameters(), weights / 1e9, cache / 1e9, gpus, decode, flops / 1e9,
                         quality.get("hellaswag"), quality.get("naturalquestions_64shot"))


def inference_table(gpu: GpuSpec, batch: int, context: int, reserve: float,
                    sizes: tuple = ("7b", "13b", "33b", "65b")) -> list[InferenceCost]:
    return [inference_cost(s, LlamaConfig.preset(s), gpu, batch, context, reserve) for s in sizes]

