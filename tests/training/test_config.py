"""PretrainConfig's stored form: version 2, partial dicts, and the layout checkpoints stored before it."""
import json
from pathlib import Path

import torch

from megallama.config import LlamaConfig
from megallama.distributed import OptimizerConfig
from megallama.training.config import PretrainConfig, TrainingArgs

PRE14_METADATA = Path(__file__).parents[1] / "fixtures/checkpoint_pre14/ckpt/iter_0000002/metadata.json"


def test_config_stored_before_version_2_reads_with_the_same_values():
    old = json.loads(PRE14_METADATA.read_text())["common"]["config"]
    c = PretrainConfig.from_dict(old)
    moved = {("model", "seq_length"): c.training.seq_length,
             ("parallel", "sequence_parallel"): c.model.sequence_parallel,
             ("parallel", "use_distributed_optimizer"): c.optimizer.use_distributed_optimizer,
             ("lr_schedule", "lr"): c.optimizer.lr,
             ("training", "bf16"): c.model.params_dtype == torch.bfloat16,
             ("training", "recompute_granularity"): c.model.recompute_granularity}
    for group, fields in old.items():
        for name, value in fields.items():
            now = moved[group, name] if (group, name) in moved else getattr(getattr(c, group), name)
            assert now == value, (group, name)
    assert (c.model.num_layers, c.model.vocab_size, c.parallel.tensor_model_parallel_size) == (2, 61, 2)
    stored = c.to_dict()
    assert stored["version"] == 2 and stored["model"]["params_dtype"] == "float32"
    assert PretrainConfig.from_dict(json.loads(json.dumps(stored))) == c


def test_partial_version_2_dicts_take_the_defaults():
    # What a converted HF checkpoint stores: the model, its layout, the tokenizer and the sequence length.
    tiny = LlamaConfig.preset("tiny", params_dtype=torch.bfloat16)
    c = PretrainConfig.from_dict({"version": 2, "model": tiny.to_dict(),
                                  "parallel": {"tensor_model_parallel_size": 2, "world_size": 2},
                                  "data": {"tokenizer_type": "NullTokenizer"}, "training": {"seq_length": 64}})
    assert c.model == tiny and c.parallel.tensor_model_parallel_size == 2 and c.training.seq_length == 64
    assert c.training.micro_batch_size == TrainingArgs().micro_batch_size and c.optimizer == OptimizerConfig()
    assert PretrainConfig.from_dict({"version": 2}) == PretrainConfig()
