"""Issue 15's "done when": a LLaMA-3-style HF directory (grouped-query attention, θ = 500000, LLaMA-3.1
rope scaling, untied head, byte-level BPE tokenizer.json) finetunes under TP=2 × PP=2 with
``--finetune --load HF_DIR``, and its checkpoint exports back to an HF directory that transformers
loads with the same logits, the same configuration and the same tokenizer."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers

from megallama.checkpoint import convert_checkpoint, load_model, open_checkpoint
from megallama.data.instructions import CHAT_TEMPLATES, encode_chat_prompt
from megallama.rope import RopeScaling
from megallama.tokenizer import HuggingFaceTokenizer
from tests.checkpoint.test_family_round_trips import hf_tensors
from tests.data.helpers import varied_text
from tests.data.test_hf_tokenizer import write_llama3_style_folder
from tests.inference.conftest import load_tool
from tests.training.test_pretrain_cli import losses_of, torchrun

convert_tool = load_tool("convert_checkpoint")
VOCAB = 608  # the tokenizer's 606 tokens, padded so that TP=2 splits the embedding evenly
TEXT = "naïve café 日本語 🦙 it's 12345 tokens\n\tend"
MESSAGES = [{"role": "system", "content": "count legs"}, {"role": "user", "content": "how many legs has a cat?"}]
# The model shape as flags (Megatron's names), equal to the HF directory's config.json.
SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
         "--group-query-attention", "--num-query-groups", "2", "--rotary-base", "500000",
         "--use-rope-scaling", "--rope-scaling-factor", "8", "--untie-embeddings-and-output-weights",
         "--norm-epsilon", "1e-5", "--vocab-size", str(VOCAB), "--seq-length", "32",
         "--max-position-embeddings", "128"]


@pytest.fixture(scope="module")
def llama3_hf(tmp_path_factory):
    """An HF LLaMA-3-style directory as transformers writes it, with the tokenizer files beside it."""
    folder = tmp_path_factory.mktemp("llama3_hf")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    write_llama3_style_folder(folder, varied_text(np.random.default_rng(1234), 800))
    return str(folder)


@pytest.fixture(scope="module")
def finetuned(llama3_hf, tmp_path_factory):
    """Two iterations of ``--finetune --load HF_DIR`` under TP=2 × PP=2, saved."""
    save = str(tmp_path_factory.mktemp("llama3_finetuned"))
    result = torchrun(*SHAPE, "--finetune", "--load", llama3_hf, "--tokenizer-type", "HuggingFaceTokenizer",
                      "--tokenizer-model", llama3_hf, "--mock-data", "--train-iters", "2",
                      "--global-batch-size", "2", "--micro-batch-size", "1", "--lr", "1e-3",
                      "--lr-warmup-iters", "1", "--eval-iters", "0", "--log-interval", "1", "--save", save,
                      "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses_of(result.stdout)) == [1, 2]
    return save


def test_finetuned_checkpoint_exports_to_transformers(llama3_hf, finetuned, tmp_path):
    out = str(tmp_path / "hf_export")
    assert convert_checkpoint(finetuned, out, "hf", progress=False) == "megallama"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    assert "tokenizer.model" not in os.listdir(out)  # nothing SentencePiece about a tokenizer.json folder

    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    config = exported.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.tie_word_embeddings) == (4, 2, False)
    assert config.rope_parameters == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}
    source = transformers.AutoTokenizer.from_pretrained(llama3_hf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer(TEXT).input_ids == source(TEXT).input_ids
    # the folder had no chat template: the export carries the one --template llama3 finetunes with
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])
    assert prompt == encode_chat_prompt(HuggingFaceTokenizer(out), MESSAGES, "llama3")
    assert (config.bos_token_id, config.eos_token_id) == (source.bos_token_id, source.eos_token_id)

    ours, reader = load_model(finetuned)
    assert reader.config.rope_scaling == RopeScaling(factor=8.0) and reader.config.rope_theta == 500000.0
    ids = torch.tensor([tokenizer(TEXT).input_ids[:32]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, ours(ids), rtol=0, atol=1e-5)
    # training moved the weights: the export is the finetuned model, not the directory it started from
    before = hf_tensors(llama3_hf)["model.layers.1.self_attn.k_proj.weight"]
    assert not torch.equal(exported.state_dict()["model.layers.1.self_attn.k_proj.weight"], before)


def test_hf_to_megallama_tp2_to_hf_is_identical(llama3_hf, tmp_path):
    ours, back = str(tmp_path / "megallama"), str(tmp_path / "hf_back")
    convert_checkpoint(llama3_hf, ours, "megallama", target_tensor_parallel_size=2, progress=False)
    reader = open_checkpoint(ours)
    assert reader.common["config"]["data"]["tokenizer_type"] == "HuggingFaceTokenizer"
    assert reader.tokenizer_model() == ours  # the tokenizer files were stored beside the weights
    assert convert_tool.main(["--load", ours, "--save", back, "--target-format", "hf",
                              "--tokenizer-model", llama3_hf]) == 0
    source, again = hf_tensors(llama3_hf), hf_tensors(back)
    assert sorted(again) == sorted(source)
    assert all(torch.equal(again[k], v) for k, v in source.items())
    with open(os.path.join(llama3_hf, "tokenizer.json")) as a, open(os.path.join(back, "tokenizer.json")) as b:
        assert a.read() == b.read()
    with open(os.path.join(llama3_hf, "tokenizer_config.json")) as a, \
            open(os.path.join(back, "tokenizer_config.json")) as b:
        written = json.load(b)  # the same, and the llama3 chat template the source folder lacked
        assert written.pop("chat_template") == CHAT_TEMPLATES["llama3"] and written == json.load(a)


def test_flags_that_change_the_model_are_refused(llama3_hf, capsys):
    """Without ``--rotary-base 500000`` the weights would silently train under another rotary embedding."""
    from megallama.pretrain import main

    default_theta = [f for f in SHAPE if f not in ("--rotary-base", "500000")]
    assert main([*default_theta, "--finetune", "--load", llama3_hf, "--mock-data", "--train-iters", "1",
                 "--lr-warmup-iters", "0", "--eval-iters", "0"]) == 1
    assert "has rope_theta 500000.0, the flags give 10000.0" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_an_instruct_folders_own_chat_template_is_kept(llama3_hf, tmp_path, where):
    folder = tmp_path / "instruct_tokenizer"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(llama3_hf, name), folder / name)
    own = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    if where == "chat_template.jinja":
        (folder / where).write_text(own)
    else:
        config = json.loads((folder / where).read_text())
        (folder / where).write_text(json.dumps({**config, "chat_template": own}))
    out = str(tmp_path / "hf_export")
    convert_checkpoint(llama3_hf, out, "hf", tokenizer_model=str(folder), progress=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == own
