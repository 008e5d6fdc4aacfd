"""Partitioning of the layer stack into pipeline stages and virtual stages.

With ``p`` pipeline ranks and ``v`` virtual stages per rank the stack is cut into ``p·v`` equal
chunks of consecutive layers; chunk ``c`` of rank ``r`` holds chunk number ``c·p + r`` of the stack
(Megatron's interleaved assignment), so the activations of one micro-batch go round the ranks ``v``
times. The embedding lives on the first chunk of rank 0 and the final norm, output head and loss on
the last chunk of rank ``p − 1``.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from megallama.config import LlamaConfig


@dataclass(frozen=True)
class StageSpec:
    """What one model chunk holds: its global layer ids and whether it embeds / applies the head."""

    layer_ids: List[int]
    pre_process: bool
    post_process: bool


def virtual_size_from_layers_per_stage(num_layers: int, pipeline_size: int,
                                       num_layers_per_virtual_stage: Optional[int]) -> Optional[int]:
    """Megatron's ``--num-layers-per-virtual-pipeline-stage`` → the number of virtual stages ``v``.

    ``None`` (the flag not given) means no interleaving and returns ``None``.
    """
    if num_layers_per_virtual_stage is None:
        return None
    if num_layers_per_virtual_stage <= 0:
        raise ValueError(f"num_layers_per_virtual_pipeline_stage must be positive, got "
                         f"{num_layers_per_virtual_stage}")
    if pipeline_size < 2:
        raise ValueError("num_layers_per_virtual_pipeline_stage needs pipeline_model_parallel_size "
                         f">= 2 (the interleaved schedule), got {pipeline_size}")
    per_rank, rest = divmod(num_layers, pipeline_size)
    if rest or per_rank % num_layers_per_virtual_stage:
        raise ValueError(
            f"num_layers ({num_layers}) is not divisible by pipeline_model_parallel_size "
            f"({pipeline_size}) × num_layers_per_virtual_pipeline_stage "
            f"({num_layers_per_virtual_stage}) = {pipeline_size * num_layers_per_virtual_stage}")
    return per_rank // num_layers_per_virtual_stage


def stage_spec(config: LlamaConfig, pipeline_size: int, pipeline_rank: int,
               virtual_size: Optional[int] = None, virtual_rank: int = 0) -> StageSpec:
    """The layers and the pre/post-processing one chunk (``pipeline_rank``, ``virtual_rank``) owns."""
    config.check_parallel_layout(pipeline_model_parallel_size=pipeline_size,
                                 virtual_pipeline_model_parallel_size=virtual_size)
    v = virtual_size or 1
    if not 0 <= pipeline_rank < pipeline_size:
        raise ValueError(f"pipeline rank {pipeline_rank} is outside a pipeline of size {pipeline_size}")
    if not 0 <= virtual_rank < v:
        raise ValueError(f"virtual pipeline rank {virtual_rank} is outside {v} virtual stages")
    per_chunk = config.num_layers // (pipeline_size * v)
    first = (virtual_rank * pipeline_size + pipeline_rank) * per_chunk
    return StageSpec(
        layer_ids=list(range(first, first + per_chunk)),
        pre_process=pipeline_rank == 0 and virtual_rank == 0,
        post_process=pipeline_rank == pipeline_size - 1 and virtual_rank == v - 1,
    )


def build_model_chunks(model_factory: Callable[[StageSpec], torch.nn.Module], config: LlamaConfig,
                       virtual_size: Optional[int] = None) -> List[torch.nn.Module]:
    """Build this rank's model chunks (one per virtual stage) with ``model_factory(spec)``.

    The pipeline rank and size come from the process groups of :mod:`megallama.parallel.state`.
    For LLaMA:
    ``build_model_chunks(lambda s: LlamaModel(cfg, pre_process=s.pre_process,
    post_process=s.post_process, layer_ids=s.layer_ids), cfg, v)``.
    """
    from megallama.parallel import state

    pp_size = state.get_pipeline_model_parallel_world_size()
    pp_rank = state.get_pipeline_model_parallel_rank()
    return [model_factory(stage_spec(config, pp_size, pp_rank, virtual_size, vr))
            for vr in range(virtual_size or 1)]
