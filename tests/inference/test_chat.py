"""Chat generation with the llama3 template: the prompt ids are the preprocessing template's up to
the assistant header, answers stop at <|eot_id|> (or EOS) without it, and tools/generate.py --chat
picks llama3 for a LLaMA-3-style tokenizer folder.

The model is a bigram table built by hand (attention and FFN outputs zeroed, so each position's
logits depend on its own token only): after the assistant header it says "four", then <|eot_id|>,
then "dogs" — so an answer that ran past <|eot_id|> shows."""
import numpy as np
import pytest
import torch

from megallama.checkpoint import load_model
from megallama.data.instructions import encode_chat_prompt, encode_conversation, record_to_conversation
from megallama.inference import SamplingParams, generate, prepare_for_inference
from megallama.inference import chat as chat_module
from megallama.inference.chat import chat_reply, chat_stop_ids, default_chat_template
from megallama.inference.text import generate_text_from_ids
from megallama.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer
from tests.data.helpers import varied_text
from tests.data.test_hf_tokenizer import write_llama3_style_folder
from tests.finetune.test_llama3_template import MESSAGES  # multi-turn, with a system prompt
from tests.inference.conftest import WORDS, load_tool, tiny_config

@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    corpus = varied_text(np.random.default_rng(5), 200) + [" ".join(WORDS)] * 5 + [" four dogs"] * 100
    return write_llama3_style_folder(tmp_path_factory.mktemp("llama3_chat") / "tok", corpus)


@pytest.fixture(scope="module")
def bigram(tmp_path_factory, llama3_folder):
    """An HF folder of the bigram model over the llama3 tokenizer, and its token ids."""
    import transformers

    tok = HuggingFaceTokenizer(llama3_folder)
    ids = {"four": tok.encode(" four"), "dogs": tok.encode(" dogs")}
    assert all(len(v) == 1 for v in ids.values())  # each word is one token, so one bigram step
    ids = {k: v[0] for k, v in ids.items()}
    ids["eot"] = tok.tokenizer.token_to_id("<|eot_id|>")
    ids["header_end"] = tok.encode("\n\n")[-1]  # the last prompt token: the assistant header ends so
    vocab = tok.tokenizer.get_vocab_size()
    config = tiny_config(num_layers=1, vocab_size=vocab + (-vocab % 64))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config.to_hf())
    chain = [("header_end", "four"), ("four", "eot"), ("eot", "dogs")]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")) or "embed" in name or "lm_head" in name:
                p.zero_()
        for dim, (token, following) in enumerate(chain):
            model.model.embed_tokens.weight[ids[token], dim] = 10.0
            model.lm_head.weight[ids[following], dim] = 1.0
    folder = tmp_path_factory.mktemp("bigram") / "hf"
    model.save_pretrained(folder)
    return str(folder), ids


@pytest.mark.parametrize("messages", [MESSAGES, MESSAGES[1:]], ids=["system", "no-system"])
def test_chat_prompt_is_the_preprocessing_ids_up_to_the_assistant_header(llama3_folder, messages, monkeypatch):
    tok = HuggingFaceTokenizer(llama3_folder)
    full, mask = encode_conversation(tok, record_to_conversation({"messages": messages}, "messages"), "llama3")
    last_answer_start = int(np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)[-1])
    expected = full[:last_answer_start].tolist()
    assert encode_chat_prompt(tok, messages[:-1], "llama3") == expected
    seen = []

    def spy(model, tokenizer, ids, *args, **kwargs):
        seen.extend(ids)
        return [""]
    monkeypatch.setattr(chat_module, "generate_text_from_ids", spy)
    chat_reply(None, tok, messages[:-1], "llama3", 4)
    assert seen == [expected]


def test_the_template_follows_the_tokenizer_and_stops_at_eot_and_eos(llama3_folder, sp_model):
    tok = HuggingFaceTokenizer(llama3_folder)
    eot = tok.tokenizer.token_to_id("<|eot_id|>")
    assert default_chat_template(tok) == "llama3"
    assert chat_stop_ids(tok, "llama3") == [eot, tok.eos_id] and eot != tok.eos_id
    assert chat_stop_ids(tok, "llama2") == [tok.eos_id]
    sp = SentencePieceTokenizer(sp_model)
    assert default_chat_template(sp) == "llama2"
    with pytest.raises(ValueError, match="lacks"):
        chat_stop_ids(sp, "llama3")


def test_answer_stops_at_eot_without_it(llama3_folder, bigram):
    tok = HuggingFaceTokenizer(llama3_folder)
    folder, ids = bigram
    model = prepare_for_inference(load_model(folder)[0])
    messages = MESSAGES[1:2]
    streamed = []
    reply = chat_reply(model, tok, messages, "llama3", 8, SamplingParams(greedy=True), streamed.append)
    assert reply == tok.decode([ids["four"]]) == "".join(streamed)
    # without the template's stop the same model runs on past <|eot_id|> into "dogs"
    prompt = encode_chat_prompt(tok, messages, "llama3")
    assert "dogs" in generate_text_from_ids(model, tok, [prompt], 8, SamplingParams(greedy=True))[0]
    stopped = generate(model, [prompt], 8, eos_id=tok.eos_id, stop_ids=chat_stop_ids(tok, "llama3"))
    assert stopped == [[ids["four"]]]


def test_generate_tool_chats_with_llama3_by_default(llama3_folder, bigram, capsys, monkeypatch, sp_model):
    import io

    tool = load_tool("generate")
    folder, _ = bigram
    flags = ["--load", folder, "--tokenizer-model", llama3_folder, "--chat", "--greedy", "--max-new-tokens", "8"]
    monkeypatch.setattr("sys.stdin", io.StringIO("how many legs\nand dogs\n\n"))
    assert tool.main([*flags, "--system", "a cat"]) == 0
    out = capsys.readouterr().out
    assert out == "user> assistant>  four\nuser> assistant>  four\nuser> "
    assert tool.main([*flags, "--template", "llama2", "--prompt", "how many legs"]) == 0
    assert "four" not in capsys.readouterr().out  # the llama2 prompt does not end in the header
    assert tool.main(["--load", folder, "--tokenizer-model", sp_model, "--chat", "--template", "llama3",
                      "--prompt", "x"]) == 1
    assert "<|start_header_id|>" in capsys.readouterr().err
    assert tool.main(["--load", folder, "--template", "llama3", "--prompt", "x"]) == 2
