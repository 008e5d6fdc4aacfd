"""Conversion between HF, Meta and megallama checkpoints: equal logits every way, HF's own
loader and generate agree with ours, Meta's layout matches its rotary formula and split rules."""
import json
import os

import pytest
import torch
import transformers

from megallama.checkpoint import convert_checkpoint, detect_format, load_model
from megallama.checkpoint.meta import meta_ffn_params
from megallama.inference import generate, prepare_for_inference
from megallama.ops import rope_cos_sin, rope_ref
from tests.inference.conftest import random_hf_model, tiny_config

PROMPT = [1, 17, 93, 4, 250, 8, 61]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A checkpoint as transformers itself writes it, and the model that wrote it."""
    folder = tmp_path_factory.mktemp("hf_source")
    hf = random_hf_model(tiny_config())
    hf.save_pretrained(folder)
    return str(folder), hf


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_hf_export_loads_in_transformers_and_generates_the_same(hf_folder, sp_model, tmp_path):
    source, hf = hf_folder
    assert detect_format(source) == "hf"
    ours = prepare_for_inference(load_model(source)[0])
    out = str(tmp_path / "hf")
    convert_checkpoint(source, out, "hf", tokenizer_model=sp_model, progress=False)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, transformers.LlamaForCausalLM)
    ids = torch.tensor([PROMPT])
    assert torch.equal(loaded(ids).logits, hf(ids).logits)
    torch.testing.assert_close(_logits(ours, ids), loaded(ids).logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        theirs = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
    assert theirs[0, len(PROMPT):].tolist() == generate(ours, [PROMPT], 20)[0]
    # the tokenizer travels along: HF's tokenizer gives SentencePiece's ids with BOS in front
    import sentencepiece as spm

    tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    text = "the old cat sat on 123 green hills"
    assert tok(text).input_ids == [sp.bos_id()] + sp.encode(text)
    assert os.path.isfile(os.path.join(out, "tokenizer.model"))


def test_hf_export_in_several_safetensors_files(hf_folder, tmp_path):
    from megallama.checkpoint import open_checkpoint
    from megallama.checkpoint.hf import INDEX_FILENAME, save_hf

    source, hf = hf_folder
    out = str(tmp_path / "hf_sharded")
    save_hf(open_checkpoint(source), out, max_shard_bytes=60_000, progress=False)
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert len(files) > 3
    with open(os.path.join(out, INDEX_FILENAME)) as f:
        assert set(json.load(f)["weight_map"]) == set(hf.state_dict())
    ids = torch.tensor([PROMPT])
    assert torch.equal(transformers.AutoModelForCausalLM.from_pretrained(out)(ids).logits, hf(ids).logits)


def _meta_rotary(x, theta=10000.0):
    """Meta's rotary embedding: consecutive pairs of each head as complex numbers times e^{i·pos·f}."""
    seq, dim = x.shape[1], x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    freqs_cis = torch.polar(torch.ones(seq, dim // 2), torch.outer(torch.arange(seq).float(), freqs))
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis[None, :, None, :]).flatten(3)


@pytest.mark.parametrize("shards", [1, 2])
def test_meta_export_import_round_trip(hf_folder, sp_model, tmp_path, shards):
    source, hf = hf_folder
    config = tiny_config()
    meta = str(tmp_path / "meta")
    convert_checkpoint(source, meta, "meta", target_tensor_parallel_size=shards, tokenizer_model=sp_model,
                       progress=False)
    assert detect_format(meta) == "meta"
    files = sorted(f for f in os.listdir(meta) if f.startswith("consolidated."))
    assert files == [f"consolidated.{i:02d}.pth" for i in range(shards)]
    with open(os.path.join(meta, "params.json")) as f:
        params = json.load(f)
    assert params == {"dim": 64, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-6, "vocab_size": 320, "multiple_of": 16}
    parts = [torch.load(os.path.join(meta, f), weights_only=True) for f in files]
    h, ffn, vocab = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    expected = {"tok_embeddings.weight": (vocab, h // shards), "output.weight": (vocab // shards, h),
                "norm.weight": (h,), "layers.1.attention.wq.weight": (h // shards, h),
                "layers.1.attention.wo.weight": (h, h // shards), "layers.1.feed_forward.w1.weight": (ffn // shards, h),
                "layers.1.feed_forward.w2.weight": (h, ffn // shards), "layers.1.attention_norm.weight": (h,)}
    for part in parts:
        assert {k: tuple(part[k].shape) for k in expected} == expected
        assert len(part) == 3 + 9 * config.num_layers
    # Meta's interleaved-pair rotary on Meta's rows scores queries against keys as HF's
    # rotate-half rotary does on HF's rows.
    x = torch.randn(1, 9, h)
    sd = hf.state_dict()
    heads, hd = config.num_attention_heads, config.head_dim
    meta_wq = torch.cat([p["layers.1.attention.wq.weight"] for p in parts])
    meta_wk = torch.cat([p["layers.1.attention.wk.weight"] for p in parts])
    q_meta = _meta_rotary((x @ meta_wq.T).view(1, 9, heads, hd))
    k_meta = _meta_rotary((x @ meta_wk.T).view(1, 9, heads, hd))
    cos, sin = rope_cos_sin(9, hd)
    q_hf = rope_ref((x @ sd["model.layers.1.self_attn.q_proj.weight"].T).view(1, 9, heads, hd), cos, sin)
    k_hf = rope_ref((x @ sd["model.layers.1.self_attn.k_proj.weight"].T).view(1, 9, heads, hd), cos, sin)
    torch.testing.assert_close(torch.einsum("bqhd,bkhd->bhqk", q_meta, k_meta),
                               torch.einsum("bqhd,bkhd->bhqk", q_hf, k_hf), rtol=1e-5, atol=1e-5)

    back, reader = load_model(meta)
    assert reader.config.ffn_hidden_size == config.ffn_hidden_size
    assert reader.tokenizer_model() is not None
    ids = torch.tensor([PROMPT])
    assert torch.equal(_logits(back, ids), _logits(load_model(source)[0], ids))
    # and on to HF again: the same tensors as the original
    again = str(tmp_path / "hf_again")
    convert_checkpoint(meta, again, "hf", progress=False)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in hf.state_dict().items())


def test_meta_params_reproduce_the_ffn_width():
    def meta_ffn(dim, multiple_of, ffn_dim_multiplier=None):  # Meta's FeedForward.__init__ rule
        hidden = int(2 * (4 * dim) / 3)
        if ffn_dim_multiplier is not None:
            hidden = int(ffn_dim_multiplier * hidden)
        return multiple_of * ((hidden + multiple_of - 1) // multiple_of)

    assert meta_ffn_params(4096, 11008) == {"multiple_of": 256}
    for dim, ffn in [(4096, 11008), (8192, 22016), (64, 176), (256, 688), (64, 100), (96, 1000)]:
        assert meta_ffn(dim, **meta_ffn_params(dim, ffn)) == ffn


def test_bad_requests_are_refused(hf_folder, tmp_path):
    source, _ = hf_folder
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_format(str(tmp_path))
    with pytest.raises(ValueError, match="not split"):
        convert_checkpoint(source, str(tmp_path / "x"), "hf", target_tensor_parallel_size=2)
    with pytest.raises(ValueError, match="unknown target format"):
        convert_checkpoint(source, str(tmp_path / "x"), "gguf")
    with pytest.raises(ValueError, match="cannot split"):
        convert_checkpoint(source, str(tmp_path / "x"), "meta", target_tensor_parallel_size=3)
