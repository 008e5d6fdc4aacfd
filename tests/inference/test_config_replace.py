"""dataclasses.replace on a LlamaConfig derives the head size, key/value heads and FFN width again
from the new shape (unless they were given), and stored configs stay plain ints."""
import dataclasses
import io
import pickle

import pytest
import torch

from megallama.config import LlamaConfig, llama_ffn_hidden_size
from megallama.model import LlamaModel

BASE = dict(num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=96, max_position_embeddings=32)


def shape(config: LlamaConfig) -> tuple:
    return config.kv_channels, config.num_query_groups, config.ffn_hidden_size


@pytest.mark.parametrize("changes", [dict(hidden_size=128), dict(num_attention_heads=8),
                                     dict(hidden_size=128, num_attention_heads=2)])
def test_replace_derives_again_what_was_derived(changes):
    replaced = dataclasses.replace(LlamaConfig(**BASE), **changes)
    assert replaced == LlamaConfig(**{**BASE, **changes})
    h, heads = replaced.hidden_size, replaced.num_attention_heads
    assert shape(replaced) == (h // heads, heads, llama_ffn_hidden_size(h))
    model = LlamaModel(replaced)  # the weights have the new shape
    assert dict(model.named_parameters())["layers.0.attention.wqkv.weight"].shape == (3 * h, h)


def test_replace_keeps_what_was_given():
    given = LlamaConfig(**BASE, num_query_groups=2, kv_channels=32, ffn_hidden_size=100)
    replaced = dataclasses.replace(given, hidden_size=128, num_attention_heads=8)
    assert shape(replaced) == (32, 2, 100)
    # a replaced copy derives again on the next replace as well
    twice = dataclasses.replace(dataclasses.replace(LlamaConfig(**BASE), hidden_size=128), num_attention_heads=2)
    assert shape(twice) == (64, 2, llama_ffn_hidden_size(128))
    with pytest.raises(ValueError, match="must divide hidden_size"):
        dataclasses.replace(LlamaConfig(**BASE), num_attention_heads=3)


def test_stored_forms_are_plain_ints_and_read_back_equal():
    config = LlamaConfig(**BASE)
    stored = config.to_dict()
    assert all(type(stored[k]) is int for k in ("kv_channels", "num_query_groups", "ffn_hidden_size"))
    buffer = io.BytesIO()
    torch.save(stored, buffer)
    buffer.seek(0)
    assert LlamaConfig.from_dict(torch.load(buffer, weights_only=True)) == config
    assert type(pickle.loads(pickle.dumps(config)).kv_channels) is int
    assert repr(config) == repr(LlamaConfig(**BASE, kv_channels=16, num_query_groups=4,
                                            ffn_hidden_size=llama_ffn_hidden_size(64)))
