"""Tensor, sequence, pipeline and data parallelism: process groups, split layers, vocab-parallel loss."""
from megallama.parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
from megallama.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_like,
    init_method_normal,
    init_parameter_,
    linear,
    main_grad_signal,
    shard_like,
    weight_grad,
)
from megallama.parallel.split import TensorSplit, is_tensor_parallel, tp_split_of
from megallama.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megallama.parallel.random import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    get_rng_tracker,
    model_parallel_manual_seed,
)
from megallama.parallel.state import (
    destroy_model_parallel,
    get_data_parallel_group,
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_pipeline_model_parallel_group,
    get_pipeline_model_parallel_rank,
    get_pipeline_model_parallel_world_size,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_src_rank,
    get_tensor_model_parallel_world_size,
    get_virtual_pipeline_model_parallel_world_size,
    initialize_model_parallel,
    is_pipeline_last_stage,
    model_parallel_is_initialized,
)
