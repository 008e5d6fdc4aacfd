"""`tools/generate.py --chat`: the template's prompt ids and greedy answers equal transformers'
(apply_chat_template + generate) on the HF export; the interactive loop keeps the conversation."""
import io

import torch

from megallama.data.instructions import encode_chat_prompt
from megallama.checkpoint import load_model
from megallama.inference.generation import SamplingParams, generate, prepare_for_inference
from megallama.tokenizer import SentencePieceTokenizer
from tests.inference.conftest import load_tool

MESSAGES = [{"role": "system", "content": "a cat"}, {"role": "user", "content": "what is the capital of france"}]


def test_chat_greedy_answer_equals_hf_generate_with_chat_template(exported, sp_model):
    import transformers

    tok = SentencePieceTokenizer(sp_model)
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported["hf"])
    hf_prompt = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    hf_prompt = list(hf_prompt if isinstance(hf_prompt, list) else hf_prompt["input_ids"])
    assert hf_prompt == encode_chat_prompt(tok, MESSAGES)
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported["hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        hf_new = hf.generate(torch.tensor([hf_prompt]), max_new_tokens=12, do_sample=False,
                             eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)[0, len(hf_prompt):].tolist()
    hf_new = hf_new[:hf_new.index(tok.eos_id)] if tok.eos_id in hf_new else hf_new
    model = prepare_for_inference(load_model(exported["megallama"])[0])  # as tools/generate.py does
    ours = generate(model, [hf_prompt], 12, SamplingParams(greedy=True), eos_id=tok.eos_id)[0]
    assert ours == hf_new and ours


def test_generate_tool_chat_prompt_and_interactive_loop(exported, sp_model, capsys, monkeypatch):
    tool = load_tool("generate")
    flags = ["--load", exported["megallama"], "--tokenizer-model", sp_model, "--chat", "--greedy",
             "--max-new-tokens", "6"]
    assert tool.main([*flags, "--system", "a cat", "--prompt", "what is the capital of france"]) == 0
    one_shot = capsys.readouterr().out
    assert one_shot.startswith("user> what is the capital of france\nassistant> ")
    monkeypatch.setattr("sys.stdin", io.StringIO("what is the capital of france\nhow many legs\n\n"))
    assert tool.main([*flags, "--system", "a cat"]) == 0
    chat = capsys.readouterr().out
    assert chat.count("assistant> ") == 2
    # The first answer is the one-shot answer (same conversation so far, greedy).
    assert chat.split("assistant> ")[1].splitlines()[0] == one_shot.split("assistant> ")[1].splitlines()[0]
    assert tool.main(["--load", exported["megallama"], "--system", "x", "--prompt", "y"]) == 2
