"""The run configuration a converted megallama checkpoint stores: version 2 for imported weights,
the source's own (either layout) with the new parallel layout when resharded."""
import torch

from megallama.checkpoint.native import _imported_run_config, _resharded_run_config
from megallama.config import LlamaConfig

CONFIG = LlamaConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=96, vocab_size=61,
                     max_position_embeddings=16)


def test_imported_weights_store_a_version_2_run_config():
    run = _imported_run_config(CONFIG, torch.bfloat16, 2, 4, None)
    assert run["version"] == 2
    assert LlamaConfig.from_run_config(run) == LlamaConfig(**{**vars(CONFIG), "params_dtype": torch.bfloat16})
    assert run["parallel"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 4, "world_size": 8}
    assert run["data"] == {"tokenizer_type": "NullTokenizer", "tokenizer_model": None}
    assert run["training"] == {"seq_length": 16}


def test_resharding_rewrites_the_layout_of_either_stored_layout():
    parallel = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "world_size": 8,
                "num_layers_per_virtual_pipeline_stage": 1, "sequence_parallel": True}
    before_version_2 = {"parallel": {**parallel, "use_distributed_optimizer": True}, "optimizer": {"clip_grad": 1.0}}
    version_2 = {"version": 2, "parallel": dict(parallel),
                 "optimizer": {"clip_grad": 1.0, "use_distributed_optimizer": True}}
    layout = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 4, "world_size": 4,
              "num_layers_per_virtual_pipeline_stage": None, "sequence_parallel": True}

    old = _resharded_run_config(before_version_2, 1, 4)
    assert old == {"parallel": {**layout, "use_distributed_optimizer": False}, "optimizer": {"clip_grad": 1.0}}
    new = _resharded_run_config(version_2, 1, 4)
    assert new == {"version": 2, "parallel": layout, "optimizer": {"clip_grad": 1.0, "use_distributed_optimizer": False}}
    assert before_version_2["parallel"]["use_distributed_optimizer"]  # the source's dict is left alone
