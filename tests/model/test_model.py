"""The model against HF transformers' LlamaForCausalLM with the same weights."""
import pytest
import torch
import torch.nn.functional as F
import transformers

from megallama.config import LlamaConfig, llama_ffn_hidden_size
from megallama.model import LlamaModel, get_param_groups, linear_cross_entropy
from tests.profiling import saved_activation_bytes


def small_config(**kw):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176,
                vocab_size=300, max_position_embeddings=64)
    return LlamaConfig(**{**base, **kw})


def hf_pair(config, seed=0):
    torch.manual_seed(seed)
    hf_cfg = config.to_hf()
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # HF initialises norms to one; make them informative
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ours = LlamaModel(config)
    ours.load_hf_state_dict(hf.state_dict())
    return hf, ours


def test_presets_match_paper_table2():
    expected = {"7b": (4096, 32, 32, 11008), "13b": (5120, 40, 40, 13824),
                "33b": (6656, 52, 60, 17920), "65b": (8192, 64, 80, 22016)}
    for name, (dim, heads, layers, ffn) in expected.items():
        c = LlamaConfig.preset(name)
        assert (c.hidden_size, c.num_attention_heads, c.num_layers, c.ffn_hidden_size) == (dim, heads, layers, ffn)
        assert (c.vocab_size, c.max_position_embeddings, c.norm_epsilon, c.rope_theta) == (32000, 2048, 1e-6, 10000.0)
    assert abs(LlamaConfig.preset("7b").num_parameters() / 1e9 - 6.74) < 0.01
    assert abs(LlamaConfig.preset("65b").num_parameters() / 1e9 - 65.3) < 0.1
    assert llama_ffn_hidden_size(256) == 768
    assert LlamaConfig.preset("tiny").num_layers == 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=100, num_attention_heads=3), "must divide hidden_size"),
    (dict(hidden_size=24, num_attention_heads=8), "must be even"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(norm_epsilon=0.0), "norm_epsilon"),
    (dict(recompute_granularity="some"), "recompute_granularity"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_config(**kwargs)
    with pytest.raises(ValueError, match="unknown LLaMA preset"):
        LlamaConfig.preset("8b")


def test_config_roundtrips_through_hf_and_dict():
    c = small_config(norm_epsilon=1e-5, rope_theta=5000.0)
    assert LlamaConfig.from_hf(c.to_hf()) == c
    assert LlamaConfig.from_dict(c.to_dict()) == c
    bad = c.to_hf()
    bad.attention_bias = True
    with pytest.raises(ValueError, match="no biases"):
        LlamaConfig.from_hf(bad)


def test_logits_and_gradients_equal_hf():
    config = small_config()
    hf, ours = hf_pair(config)
    ids = torch.randint(0, config.vocab_size, (3, 37))
    targets = torch.randint(0, config.vocab_size, (3, 37))
    ref = hf(input_ids=ids).logits
    got = ours(ids)
    assert got.shape == (3, 37, config.vocab_size)
    assert (got - ref).abs().max().item() < 1e-4

    F.cross_entropy(ref.reshape(-1, config.vocab_size), targets.reshape(-1)).backward()
    loss = ours(ids, labels=targets)
    assert loss.shape == (3, 37)
    ref_loss = F.cross_entropy(ref.detach().reshape(-1, config.vocab_size), targets.reshape(-1), reduction="none")
    torch.testing.assert_close(loss.reshape(-1), ref_loss, rtol=1e-5, atol=1e-5)
    loss.mean().backward()
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    our_grads = {k: p.grad for k, p in ours.named_parameters()}
    from megallama.parameter_table import ours_to_hf
    mapped = ours_to_hf(ours.parameter_table, our_grads)
    assert set(mapped) == set(hf_grads)
    for name, g in mapped.items():
        torch.testing.assert_close(g, hf_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_hf_state_dict_round_trip():
    config = small_config()
    hf, ours = hf_pair(config, seed=1)
    back = ours.hf_state_dict()
    ref = hf.state_dict()
    assert set(back) == {k for k in ref if "rotary" not in k}
    for k, v in back.items():
        assert torch.equal(v, ref[k]), k


def test_linear_cross_entropy_matches_torch_with_ignore_index_and_chunks():
    torch.manual_seed(0)
    hn = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 40, (50,))
    target[::7] = -100
    weights = torch.rand(50, dtype=torch.float64)
    loss = linear_cross_entropy(hn, w, target, chunk_tokens=16)
    ref = F.cross_entropy(hn @ w.t(), target, reduction="none", ignore_index=-100)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    g1 = torch.autograd.grad((loss * weights).sum(), (hn, w))
    g2 = torch.autograd.grad((ref * weights).sum(), (hn, w))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="target ids must lie"):
        linear_cross_entropy(hn, w, torch.full((50,), 40))


def test_gradcheck_hand_written_backwards():
    from megallama.model import _QKVRotary, _SwiGLUFeedForward
    from megallama import ops, parallel
    torch.manual_seed(0)
    d = dict(dtype=torch.float64, requires_grad=True)
    xn = torch.randn(2, 5, 8, **d)
    column = parallel.ColumnParallelLinear(8, 12)  # serial: supplies the (identity) input gather
    fn = lambda x, w13, w2: _SwiGLUFeedForward.apply(x, w13, w2, column)
    assert torch.autograd.gradcheck(fn, (xn, torch.randn(12, 8, **d), torch.randn(8, 6, **d)))
    cos, sin = ops.rope_cos_sin(5, 4)  # the rotary tables stay float32, as in the model
    for parts in ((8, 8, 8), (16, 4, 4)):  # q, k, v rows: 2 heads each; 4 query heads sharing 1 key/value head
        qkv = parallel.ColumnParallelLinear(8, 24, split=parallel.TensorSplit(0, parts))
        fn = lambda x, w: _QKVRotary.apply(x, w, cos, sin, 4, qkv)
        assert torch.autograd.gradcheck(fn, (xn, torch.randn(24, 8, **d)))
    hn = torch.randn(6, 8, **d)
    fn = lambda h, w: linear_cross_entropy(h, w, torch.tensor([0, 3, 9, -100, 2, 1]), chunk_tokens=4)
    assert torch.autograd.gradcheck(fn, (hn, torch.randn(10, 8, **d)))


def test_pipeline_stages_compose_to_full_model():
    config = small_config(num_layers=4)
    torch.manual_seed(0)
    full = LlamaModel(config)
    first = LlamaModel(config, post_process=False, layer_ids=[0, 1])
    last = LlamaModel(config, pre_process=False, layer_ids=[2, 3])
    sd = full.state_dict()
    first.load_state_dict({k: v for k, v in sd.items() if k in first.state_dict()})
    last.load_state_dict({k: v for k, v in sd.items() if k in last.state_dict()})
    ids = torch.randint(0, config.vocab_size, (2, 9))
    torch.testing.assert_close(last(hidden_states=first(ids)), full(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="layer ids"):
        LlamaModel(config, layer_ids=[4])


def test_full_recompute_gives_same_gradients():
    config = small_config()
    torch.manual_seed(0)
    a = LlamaModel(config)
    b = LlamaModel(small_config(recompute_granularity="full"))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 11))
    for m in (a, b):
        m(ids, labels=ids).sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_layer_saves_fewer_activation_bytes_than_plain_autograd():
    """A layer keeps exactly the planned activations, under 2/3 of HF's plain-autograd layer."""
    config = small_config(num_layers=1, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4)
    hf, ours = hf_pair(config)
    x = torch.randn(2, 64, config.hidden_size, requires_grad=True)
    hf_layer = hf.model.layers[0]
    pos = hf.model.rotary_emb(x, torch.arange(64)[None])
    hf_bytes = saved_activation_bytes(lambda: hf_layer(x, position_embeddings=pos).sum(),
                                      exclude=list(hf.parameters()))
    cos, sin = ours.rotary(64, x.device)
    our_bytes = saved_activation_bytes(lambda: ours.layers["0"](x, cos, sin).sum(),
                                       exclude=list(ours.parameters()))
    tokens, h, f, heads = 2 * 64, config.hidden_size, config.ffn_hidden_size, config.num_attention_heads
    # per token: x, xn, q, k, v, attention output, h, xn (hidden each), [w1 xn, w3 xn] (2·ffn),
    # two rstd and the attention's log-sum-exp per head; plus the rotary tables (64 × head_dim/2, ×2)
    planned = 4 * tokens * (8 * h + 2 * f + 2 + heads) + 2 * 4 * 64 * (h // heads // 2)
    assert our_bytes == planned, (our_bytes, planned)
    assert our_bytes < 0.66 * hf_bytes, (our_bytes, hf_bytes)


def test_param_groups_decay_matrices_only():
    model = LlamaModel(small_config())
    decay, no_decay = get_param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
