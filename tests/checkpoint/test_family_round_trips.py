"""LLaMA-2/3/3.2-style checkpoints survive every conversion bit for bit: HF → megallama at TP 1, 2
and 4 (4 ranks over 2 K/V heads replicate them) → HF, and HF → Meta → HF where Meta's params.json can
say the configuration (its only rope scaling is use_scaled_rope, LLaMA-3.1's factor 8)."""
import os

import pytest
import torch
from safetensors.torch import load_file

from megallama.checkpoint import convert_checkpoint, open_checkpoint
from megallama.rope import RopeScaling
from tests.inference.conftest import random_hf_model, tiny_config

FAMILIES = {
    "llama2-gqa": tiny_config(num_query_groups=2),
    "llama3": tiny_config(num_query_groups=2, rope_theta=500000.0, rope_scaling=RopeScaling(factor=8.0)),
    "llama3.2-tied": tiny_config(num_query_groups=2, rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0),
                                 tie_word_embeddings=True),
}


def hf_tensors(folder) -> dict:
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, name)))
    return tensors


def assert_same_tensors(folder, source):
    got, want = hf_tensors(folder), hf_tensors(source)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_hf(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"hf_{request.param}")
    random_hf_model(FAMILIES[request.param]).save_pretrained(folder)
    return request.param, str(folder)


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_hf_megallama_hf_is_identical(family_hf, tmp_path, tp, pp):
    family, source = family_hf
    ours, back = str(tmp_path / "megallama"), str(tmp_path / "hf")
    convert_checkpoint(source, ours, "megallama", target_tensor_parallel_size=tp, target_pipeline_parallel_size=pp,
                       progress=False)
    assert open_checkpoint(ours).config == open_checkpoint(source).config
    convert_checkpoint(ours, back, "hf", progress=False)
    assert_same_tensors(back, source)


def test_hf_meta_hf_is_identical_or_refused(family_hf, tmp_path):
    family, source = family_hf
    meta, back = str(tmp_path / "meta"), str(tmp_path / "hf")
    config = FAMILIES[family]
    if config.rope_scaling not in (None, RopeScaling()):
        with pytest.raises(ValueError, match="Meta's params.json can say only use_scaled_rope"):
            convert_checkpoint(source, meta, "meta", progress=False)
        return
    convert_checkpoint(source, meta, "meta", target_tensor_parallel_size=2, progress=False)
    reader = open_checkpoint(meta)
    assert (reader.config.num_query_groups, reader.config.rope_theta, reader.config.rope_scaling) == (
        config.num_query_groups, config.rope_theta, config.rope_scaling)
    convert_checkpoint(meta, back, "hf", progress=False)
    assert_same_tensors(back, source)
