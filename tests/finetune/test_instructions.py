"""Instruction formats → ids and loss mask; the preprocessing tool; the chat template in HF files."""
import json

import numpy as np
import pytest

from megallama.data.indexed import IndexedDataset
from megallama.data.instructions import (Conversation, InstructionError, encode_chat_prompt,
                                         encode_conversation, output_prefixes, preprocess_instructions,
                                         record_to_conversation)
from megallama.data.jsonl import BadLineError
from megallama.tokenizer import SentencePieceTokenizer
from tests.finetune.conftest import alpaca_records, write_jsonl


def expected(tok, system, exchanges):
    """Ids and mask written out by hand from the template's definition."""
    ids, mask = [], []
    for i, (user, answer) in enumerate(exchanges):
        block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system and i == 0 else ""
        prompt = [tok.bos_id] + tok.encode(f"[INST] {block}{user} [/INST]")
        reply = tok.encode(answer) + [tok.eos_id]
        ids += prompt + reply
        mask += [0] * len(prompt) + [1] * len(reply)
    return ids, mask


@pytest.mark.parametrize("fmt, record, system, exchanges", [
    ("alpaca", {"instruction": "what is the capital", "input": "of france", "output": "paris"},
     "", [("what is the capital\n\nof france", "paris")]),
    ("alpaca", {"instruction": " how many legs ", "output": "four "}, "", [("how many legs", "four")]),
    ("flan", {"inputs": "why is the sky blue", "targets": "light scatters"}, "",
     [("why is the sky blue", "light scatters")]),
    ("messages", {"messages": [{"role": "system", "content": "a cat"},
                               {"role": "user", "content": "how many legs does a cat have"},
                               {"role": "assistant", "content": "four"},
                               {"role": "user", "content": "dogs too"},
                               {"role": "assistant", "content": "four 123"}]},
     "a cat", [("how many legs does a cat have", "four"), ("dogs too", "four 123")]),
])
def test_formats_give_the_expected_ids_and_mask(sp_model, fmt, record, system, exchanges):
    tok = SentencePieceTokenizer(sp_model)
    ids, mask = encode_conversation(tok, record_to_conversation(record, fmt))
    want_ids, want_mask = expected(tok, system, exchanges)
    assert ids.tolist() == want_ids and mask.tolist() == want_mask
    # every assistant turn is trained and ends with EOS; no user/system token is
    answers = [i for i, m in zip(ids.tolist(), mask.tolist()) if m]
    assert answers == [t for _, a in exchanges for t in tok.encode(a) + [tok.eos_id]]


@pytest.mark.parametrize("fmt, record, reason", [
    ("alpaca", {"instruction": "x"}, "missing key 'output'"),
    ("alpaca", {"instruction": "  ", "output": "y"}, "empty 'instruction'"),
    ("flan", {"inputs": 3, "targets": "y"}, "key 'inputs' is not a string"),
    ("messages", {"messages": [{"role": "user", "content": "a"}]}, "ends without an assistant"),
    ("messages", {"messages": [{"role": "assistant", "content": "a"}]}, "alternating"),
    ("messages", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternating"),
    ("messages", {"messages": [{"role": "bot", "content": "a"}]}, "role of"),
    ("messages", {"messages": []}, "non-empty list"),
])
def test_bad_records_name_their_reason(fmt, record, reason):
    with pytest.raises(InstructionError, match=reason):
        record_to_conversation(record, fmt)


def test_preprocess_writes_ids_and_mask_with_the_same_documents(tmp_path, sp_model):
    records = alpaca_records(50) + ["{broken", json.dumps({"instruction": "x"}), ""]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    summary = preprocess_instructions([path], str(tmp_path / "out"), "alpaca", sp_model, workers=2,
                                      progress=False, batch_lines=16)
    assert summary.conversations == 50
    assert dict(summary.skipped) == {"broken JSON": 1, "missing key 'output'": 1, "blank line": 1}
    ids, mask = (IndexedDataset(p) for p in output_prefixes(str(tmp_path / "out")))
    assert mask.dtype == np.uint8 and np.array_equal(ids.sequence_lengths, mask.sequence_lengths)
    assert ids.num_documents == mask.num_documents == 50
    tok = SentencePieceTokenizer(sp_model)
    for d, record in enumerate(records[:50]):
        want_ids, want_mask = encode_conversation(tok, record_to_conversation(record, "alpaca"))
        assert ids[d].tolist() == want_ids.tolist() and mask[d].tolist() == want_mask.tolist()
    assert summary.answer_tokens == int(sum(mask[d].sum() for d in range(50)))
    with pytest.raises(BadLineError, match=r"a.jsonl:51: broken JSON"):
        preprocess_instructions([path], str(tmp_path / "strict"), "alpaca", sp_model, strict=True, progress=False)


def test_tool_reports_counts(tmp_path, sp_model, capsys):
    from tests.inference.conftest import load_tool

    path = write_jsonl(tmp_path / "f.jsonl", [{"inputs": "a cat", "targets": "four"}, "[]"])
    tool = load_tool("preprocess_instructions")
    assert tool.main(["--input", path, "--format", "flan", "--tokenizer-model", sp_model,
                      "--output-prefix", str(tmp_path / "f"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 conversations" in out and "1 not a JSON object" in out
    assert tool.main(["--input", path, "--format", "flan", "--tokenizer-model", sp_model,
                      "--output-prefix", str(tmp_path / "g"), "--strict", "--no-progress"]) == 1
    assert "f.jsonl:2: not a JSON object" in capsys.readouterr().err


def test_hf_export_chat_template_gives_our_ids(tmp_path, sp_model):
    """transformers' apply_chat_template on the HF export's tokenizer files = our ids, for full
    conversations and for a generation prompt."""
    import torch
    import transformers

    from megallama.config import LlamaConfig
    from megallama.checkpoint import convert_checkpoint

    config = LlamaConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, vocab_size=320,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config.to_hf()).save_pretrained(tmp_path / "hf_in")
    convert_checkpoint(str(tmp_path / "hf_in"), str(tmp_path / "hf"), "hf", tokenizer_model=sp_model, progress=False)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok = SentencePieceTokenizer(sp_model)
    messages = [{"role": "system", "content": "the sky\nlooks blue"},
                {"role": "user", "content": " what is the capital of france 123 "},
                {"role": "assistant", "content": "paris is a city\non the river seine"},
                {"role": "user", "content": "how many legs"},
                {"role": "assistant", "content": "four"}]

    def hf_ids(msgs, **kw):
        out = hf_tok.apply_chat_template(msgs, tokenize=True, **kw)
        return list(out["input_ids"] if not isinstance(out, list) else out)

    ours, _ = encode_conversation(tok, record_to_conversation({"messages": messages}, "messages"))
    assert hf_ids(messages) == ours.tolist()
    assert hf_ids(messages[:4], add_generation_prompt=True) == encode_chat_prompt(tok, messages[:4])
    assert hf_ids(messages[1:2], add_generation_prompt=True) == encode_chat_prompt(tok, messages[1:2])


def test_chat_prompt_must_end_with_user(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    with pytest.raises(InstructionError, match="end with a user"):
        encode_chat_prompt(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert encode_conversation(tok, Conversation("", [("a cat", None)]))[1].sum() == 0
