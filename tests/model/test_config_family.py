"""LLaMA-2/3 shapes in LlamaConfig: grouped-query attention, head size, LLaMA-3.1 rope scaling and
tied embeddings, against the published sizes, transformers and Meta's params.json."""
import json
import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from megallama import ops
from megallama.checkpoint.meta import MetaReader, meta_params
from megallama.config import LlamaConfig, RopeScaling, llama_ffn_hidden_size
from megallama.rope import scale_inv_freq

# name: layers, dim, heads, kv heads, ffn, vocab, max positions, published parameters (billions)
PUBLISHED = {
    "llama2-7b": (32, 4096, 32, 32, 11008, 32000, 4096, 6.74),
    "llama2-13b": (40, 5120, 40, 40, 13824, 32000, 4096, 13.0),
    "llama2-70b": (80, 8192, 64, 8, 28672, 32000, 4096, 69.0),
    "llama3-8b": (32, 4096, 32, 8, 14336, 128256, 8192, 8.03),
    "llama3-70b": (80, 8192, 64, 8, 28672, 128256, 8192, 70.6),
    "llama3.2-1b": (16, 2048, 32, 8, 8192, 128256, 131072, 1.24),
    "llama3.2-3b": (28, 3072, 24, 8, 8192, 128256, 131072, 3.21),
}


@pytest.mark.parametrize("dim, multiple_of, multiplier, ffn", [
    (4096, 256, None, 11008), (5120, 256, None, 13824),               # LLaMA-2 7B, 13B (and LLaMA-1)
    (8192, 4096, 1.3, 28672),                                         # LLaMA-2 70B, LLaMA-3 70B
    (4096, 1024, 1.3, 14336),                                         # LLaMA-3 8B
    (2048, 256, 1.5, 8192), (3072, 256, 1.0, 8192),                   # LLaMA-3.2 1B, 3B
])
def test_ffn_width_follows_metas_rule(dim, multiple_of, multiplier, ffn):
    assert llama_ffn_hidden_size(dim, multiple_of, multiplier) == ffn


@pytest.mark.parametrize("name", PUBLISHED)
def test_presets_have_the_published_shapes_and_sizes(name):
    layers, dim, heads, kv_heads, ffn, vocab, positions, billions = PUBLISHED[name]
    c = LlamaConfig.preset(name)
    assert (c.num_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups, c.ffn_hidden_size,
            c.vocab_size, c.max_position_embeddings, c.norm_epsilon) == (
        layers, dim, heads, kv_heads, ffn, vocab, positions, 1e-5)
    assert c.head_dim == dim // heads  # 64 for LLaMA-3.2 1B, 128 for the others
    assert abs(c.num_parameters() / 1e9 / billions - 1) < 0.01
    assert c.rope_theta == (500000.0 if name.startswith("llama3") else 10000.0)
    small = name.startswith("llama3.2")
    assert c.tie_word_embeddings is small
    assert c.rope_scaling == (RopeScaling(factor=32.0) if small else None)


def test_tied_embedding_counts_once_and_is_the_head():
    tied = LlamaConfig.preset("llama3.2-1b")
    untied = LlamaConfig.preset("llama3.2-1b", tie_word_embeddings=False)
    matrix = tied.vocab_size * tied.hidden_size
    assert untied.num_parameters() - tied.num_parameters() == matrix
    assert tied.num_parameters(include_embedding=False) == tied.num_parameters()
    assert untied.num_parameters(include_embedding=False) == tied.num_parameters()


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_attention_heads=8, num_query_groups=3), r"num_query_groups \(3\) must divide num_attention_heads \(8\)"),
    (dict(num_query_groups=0), "num_query_groups must be a positive integer"),
    (dict(kv_channels=15), "kv_channels = 15 must be even"),
    (dict(hidden_size=100, num_attention_heads=3), "must divide hidden_size"),
    (dict(rope_scaling={"factor": 8.0}), "rope_scaling must be a RopeScaling"),
])
def test_new_fields_are_validated(kwargs, message):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=100)
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**{**base, **kwargs})


def test_defaults_resolve_and_an_explicit_head_size_frees_the_hidden_size():
    c = LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=100)
    assert (c.num_query_groups, c.kv_channels, c.head_dim) == (4, 16, 16)
    wide = LlamaConfig(num_layers=2, hidden_size=100, num_attention_heads=3, kv_channels=32, vocab_size=100)
    assert wide.head_dim == 32
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)


def test_parallel_layout_splits_or_replicates_key_value_heads():
    c = LlamaConfig.preset("llama3-8b")
    c.check_parallel_layout(8)
    c.check_parallel_layout(16)  # 8 key/value heads, each on two ranks
    with pytest.raises(ValueError, match=r"num_query_groups \(6\) and tensor_model_parallel_size \(4\)"):
        LlamaConfig(num_layers=2, hidden_size=192, num_attention_heads=12, num_query_groups=6,
                    ffn_hidden_size=64, vocab_size=100).check_parallel_layout(4)


def test_dict_round_trip_and_dicts_stored_before_the_new_fields():
    c = LlamaConfig.preset("llama3.2-1b", num_layers=2, params_dtype=torch.bfloat16)
    stored = json.loads(json.dumps(c.to_dict()))
    assert stored["rope_scaling"] == {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}
    assert LlamaConfig.from_dict(stored) == c
    old = {k: v for k, v in LlamaConfig.preset("tiny").to_dict().items()
           if k not in ("num_query_groups", "kv_channels", "rope_scaling", "tie_word_embeddings")}
    loaded = LlamaConfig.from_dict(old)
    assert loaded == LlamaConfig.preset("tiny")
    assert (loaded.num_query_groups, loaded.kv_channels, loaded.rope_scaling, loaded.tie_word_embeddings) == (
        4, 64, None, False)
    shape = {k: old[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                                 "vocab_size", "max_position_embeddings")}
    v1 = LlamaConfig.from_run_config({"model": {**shape, "seq_length": 64}, "training": {"bf16": True}})
    assert v1 == LlamaConfig.preset("tiny", params_dtype=torch.bfloat16)


# Reduced sizes that keep each preset's heads, key/value heads, tying and rope.
REDUCED = dict(num_layers=2, ffn_hidden_size=128, vocab_size=500)


@pytest.mark.parametrize("name", PUBLISHED)
def test_hf_config_round_trip(name):
    c = LlamaConfig.preset(name, hidden_size=LlamaConfig.preset(name).num_attention_heads * 8, **REDUCED)
    hf = c.to_hf()
    assert isinstance(hf, transformers.LlamaConfig)
    assert (hf.num_key_value_heads, hf.head_dim, hf.tie_word_embeddings) == (
        c.num_query_groups, 8, c.tie_word_embeddings)
    assert hf.rope_parameters["rope_theta"] == c.rope_theta
    assert hf.rope_parameters["rope_type"] == ("llama3" if c.rope_scaling else "default")
    assert LlamaConfig.from_hf(hf) == c
    assert LlamaConfig.from_hf(transformers.LlamaConfig.from_dict(hf.to_dict())) == c


def test_hf_head_dim_apart_from_the_hidden_size_round_trips():
    c = LlamaConfig(num_layers=2, hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=32,
                    ffn_hidden_size=128, vocab_size=500)
    assert LlamaConfig.from_hf(c.to_hf()) == c


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "linear", "factor": 2.0}, "rope_type 'linear' is not supported"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}, "rope_type 'yarn'"),
])
def test_hf_other_rope_types_are_refused(rope, message):
    hf = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                  vocab_size=100, max_position_embeddings=1024, rope_scaling=rope)
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf(hf)


@pytest.mark.parametrize("scaling", [RopeScaling(), RopeScaling(factor=32.0),
                                     RopeScaling(factor=4.0, low_freq_factor=2.0, high_freq_factor=8.0,
                                                 original_max_position_embeddings=512)])
@pytest.mark.parametrize("head_dim, theta", [(128, 500000.0), (64, 10000.0)])
def test_rope_scaling_matches_transformers_llama3(scaling, head_dim, theta):
    c = LlamaConfig(num_layers=1, hidden_size=4 * head_dim, num_attention_heads=4, ffn_hidden_size=64,
                    vocab_size=100, max_position_embeddings=131072, rope_theta=theta, rope_scaling=scaling)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](c.to_hf(), torch.device("cpu"))
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    torch.testing.assert_close(scale_inv_freq(plain, scaling), theirs, rtol=0, atol=1e-6)
    # what the model's tables use: the angle of position 1 is inv_freq
    cos, sin = ops.rope_cos_sin(2, head_dim, theta, scaling=scaling)
    torch.testing.assert_close(torch.atan2(sin[1], cos[1]), theirs, rtol=0, atol=1e-6)
    # short wavelengths are kept, the longest divided by the factor
    assert plain[0] == theirs[0] and math.isclose(plain[-1] / theirs[-1], scaling.factor, rel_tol=1e-6)
    assert torch.equal(ops.rope_cos_sin(5, head_dim, theta, offset=3)[0],
                       ops.rope_cos_sin(5, head_dim, theta, offset=3, scaling=None)[0])


def _meta_folder(tmp_path, params, config, with_head=True):
    shard = {"tok_embeddings.weight": torch.zeros(config.vocab_size, config.hidden_size),
             "layers.0.feed_forward.w1.weight": torch.zeros(config.ffn_hidden_size, config.hidden_size)}
    if with_head:
        shard["output.weight"] = torch.zeros(config.vocab_size, config.hidden_size)
    torch.save(shard, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(params))
    return str(tmp_path)


@pytest.mark.parametrize("name", ["llama2-70b", "llama3-8b", "llama3-70b"])
def test_meta_params_carry_gqa_theta_and_ffn(name, tmp_path):
    c = LlamaConfig.preset(name)
    params = meta_params(c)
    assert params["n_kv_heads"] == 8
    assert params.get("rope_theta", 10000.0) == c.rope_theta
    assert llama_ffn_hidden_size(c.hidden_size, params["multiple_of"], params.get("ffn_dim_multiplier")) == \
        c.ffn_hidden_size
    small = LlamaConfig.preset(name, num_layers=1, hidden_size=c.num_attention_heads * 2, ffn_hidden_size=96,
                               vocab_size=50, max_position_embeddings=8192)
    read = MetaReader(_meta_folder(tmp_path, meta_params(small), small), max_position_embeddings=8192).config
    assert read == small


def test_meta_use_scaled_rope_is_llama31s_and_only_that_is_written(tmp_path):
    llama31 = LlamaConfig.preset("llama3-8b", num_layers=1, hidden_size=64, ffn_hidden_size=96, vocab_size=50,
                                 max_position_embeddings=131072, rope_scaling=RopeScaling())
    params = meta_params(llama31)
    assert params["use_scaled_rope"] is True
    assert MetaReader(_meta_folder(tmp_path, params, llama31), max_position_embeddings=131072).config == llama31
    with pytest.raises(ValueError, match="can say only use_scaled_rope"):
        meta_params(LlamaConfig.preset("llama3.2-1b"))
    with pytest.raises(ValueError, match="no head size"):
        meta_params(LlamaConfig(num_layers=1, hidden_size=64, num_attention_heads=4, kv_channels=32,
                                ffn_hidden_size=96, vocab_size=50))


def test_meta_checkpoint_without_a_head_reads_as_tied(tmp_path):
    c = LlamaConfig(num_layers=1, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                    vocab_size=50, tie_word_embeddings=True)
    assert MetaReader(_meta_folder(tmp_path, meta_params(c), c, with_head=False)).config == c
