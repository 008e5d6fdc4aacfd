"""Pipeline parallelism: stage partitioning, p2p exchange between stages, schedules."""
from megallama.pipeline.p2p import ActivationShape, PipelineCommunicator
from megallama.pipeline.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
)
from megallama.pipeline.stages import (
    StageSpec,
    build_model_chunks,
    stage_spec,
    virtual_size_from_layers_per_stage,
)

__all__ = [
    "ActivationShape", "PipelineCommunicator", "StageSpec", "build_model_chunks",
    "forward_backward_no_pipelining", "forward_backward_pipelining_with_interleaving",
    "forward_backward_pipelining_without_interleaving", "get_forward_backward_func", "stage_spec",
    "virtual_size_from_layers_per_stage",
]
