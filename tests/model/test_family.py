"""The LLaMA-2/3 knobs against HF transformers: grouped-query attention, a per-head size of its own,
LLaMA-3.1 RoPE scaling with θ = 500000, tied embeddings. Logits, per-token losses and every
gradient equal HF's with the same weights; KV-cache decoding equals a full recompute."""
import pytest
import torch
import torch.nn.functional as F

from megallama.config import LlamaConfig, RopeScaling
from megallama.inference.generation import generate, prepare_for_inference
from megallama.model import LlamaModel
from megallama.parameter_table import ours_to_hf
from tests.model.test_model import hf_pair

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=8, ffn_hidden_size=160, vocab_size=300,
            max_position_embeddings=128)
FAMILY = {
    "llama2-gqa": dict(num_query_groups=2, norm_epsilon=1e-5),
    "llama3-gqa-rope-scaling": dict(num_query_groups=4, rope_theta=500000.0, norm_epsilon=1e-5,
                                    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                             original_max_position_embeddings=32)),
    "llama3.2-tied": dict(num_query_groups=2, tie_word_embeddings=True, rope_theta=500000.0,
                          rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=16)),
    "kv-channels": dict(num_query_groups=1, kv_channels=16),  # head size 16, not 64 / 8
}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_logits_losses_and_gradients_equal_hf(name):
    config = LlamaConfig(**{**BASE, **FAMILY[name]})
    hf, ours = hf_pair(config)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, 100), generator=gen)  # beyond the scaled original length
    targets = torch.randint(0, config.vocab_size, (2, 100), generator=gen)
    ref = hf(ids).logits
    torch.testing.assert_close(ours(ids), ref.detach(), rtol=1e-4, atol=1e-4)
    F.cross_entropy(ref.reshape(-1, config.vocab_size), targets.reshape(-1)).backward()
    loss = ours(ids, labels=targets)
    torch.testing.assert_close(loss.mean(), F.cross_entropy(ref.detach().reshape(-1, config.vocab_size),
                                                            targets.reshape(-1)), rtol=1e-5, atol=1e-5)
    loss.mean().backward()
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    mapped = ours_to_hf(ours.parameter_table, {k: p.grad for k, p in ours.named_parameters()})
    assert set(mapped) == set(hf_grads)
    for key, grad in mapped.items():
        torch.testing.assert_close(grad, hf_grads[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_kv_cache_decoding_equals_full_recompute(name):
    config = LlamaConfig(**{**BASE, **FAMILY[name]})
    torch.manual_seed(0)
    model = prepare_for_inference(LlamaModel(config))
    prompts = [[5, 9, 200, 3], [7, 1]]
    cached = generate(model, prompts, max_new_tokens=6)
    recomputed = generate(model, prompts, max_new_tokens=6, use_cache=False)
    assert cached == recomputed


def test_tied_model_has_one_embedding_matrix():
    config = LlamaConfig(**{**BASE, **FAMILY["llama3.2-tied"]})
    model = LlamaModel(config)
    names = [name for name, _ in model.named_parameters()]
    assert "output.weight" not in names and "tok_embeddings.weight" in names
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
