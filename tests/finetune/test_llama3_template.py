"""The llama3 template: with a LLaMA-3-style HF tokenizer folder our ids are transformers'
``apply_chat_template`` with our Jinja, the loss mask covers exactly the answers and their
<|eot_id|>, and the preprocessing tool writes datasets that pack for finetuning."""
import numpy as np
import pytest

from megallama.data.indexed import IndexedDataset
from megallama.data.instructions import (CHAT_TEMPLATES, encode_chat_prompt, encode_conversation,
                                         output_prefixes, record_to_conversation)
from megallama.tokenizer import HuggingFaceTokenizer
from tests.data.helpers import varied_text
from tests.data.test_hf_tokenizer import write_llama3_style_folder
from tests.finetune.conftest import WORDS, write_jsonl
from tests.inference.conftest import load_tool

MESSAGES = [{"role": "system", "content": " you are a cat\nwho counts legs "},
            {"role": "user", "content": "how many legs does a cat have?\n\n"},
            {"role": "assistant", "content": "\nfour, naïve 🦙 123456 "},
            {"role": "user", "content": "?and dogs"},
            {"role": "assistant", "content": "'s four too\n\tend"}]


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    corpus = varied_text(np.random.default_rng(5), 200) + [" ".join(WORDS)] * 5
    return write_llama3_style_folder(tmp_path_factory.mktemp("llama3_chat") / "tok", corpus)


def hf_chat_ids(folder, messages, **kwargs):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    out = reference.apply_chat_template(messages, chat_template=CHAT_TEMPLATES["llama3"], tokenize=True, **kwargs)
    return list(out if isinstance(out, list) else out["input_ids"])


@pytest.mark.parametrize("messages", [MESSAGES, MESSAGES[1:], MESSAGES[1:3]])
def test_ids_are_apply_chat_template_and_the_mask_is_the_answers(llama3_folder, messages):
    tok = HuggingFaceTokenizer(llama3_folder)
    ids, mask = encode_conversation(tok, record_to_conversation({"messages": messages}, "messages"), "llama3")
    assert ids.tolist() == hf_chat_ids(llama3_folder, messages)
    assert ids[0] == tok.bos_id == tok.tokenizer.token_to_id("<|begin_of_text|>")
    eot = tok.tokenizer.token_to_id("<|eot_id|>")
    answers = [tok.encode(m["content"].strip()) + [eot] for m in messages if m["role"] == "assistant"]
    assert ids[mask == 1].tolist() == [t for answer in answers for t in answer]
    # each trained stretch is one whole answer: what follows its <|eot_id|> is untrained
    assert np.count_nonzero(np.diff(np.concatenate([[0], mask, [0]])) == 1) == len(answers)


def test_generation_prompt_is_apply_chat_templates(llama3_folder):
    tok = HuggingFaceTokenizer(llama3_folder)
    for messages in (MESSAGES[:4], MESSAGES[1:2]):
        assert encode_chat_prompt(tok, messages, "llama3") == hf_chat_ids(
            llama3_folder, messages, add_generation_prompt=True)


def test_tool_writes_llama3_datasets_that_pack(tmp_path, llama3_folder):
    from megallama.data.sft_dataset import build_sft_datasets

    records = [{"messages": MESSAGES}, {"messages": MESSAGES[1:3]},
               {"messages": [{"role": "user", "content": "what is the capital of france"},
                             {"role": "assistant", "content": "paris"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    prefix = str(tmp_path / "chat")
    tool = load_tool("preprocess_instructions")
    assert tool.main(["--input", path, "--format", "messages", "--tokenizer-type", "HuggingFaceTokenizer",
                      "--tokenizer-model", llama3_folder, "--template", "llama3", "--output-prefix", prefix,
                      "--workers", "2", "--no-progress"]) == 0
    ids, mask = (IndexedDataset(p) for p in output_prefixes(prefix))
    tok = HuggingFaceTokenizer(llama3_folder)
    for d, record in enumerate(records):
        want_ids, want_mask = encode_conversation(tok, record_to_conversation(record, "messages"), "llama3")
        assert ids[d].tolist() == want_ids.tolist() and mask[d].tolist() == want_mask.tolist()

    train, valid, test = build_sft_datasets(prefix, "100,0,0", 160, [None, 0, 0], seed=0, pad_id=tok.pad_id,
                                            cache_dir=str(tmp_path / "cache"))
    assert valid is None and test is None and train.truncated == 0 and len(train) == 2
    for row in range(len(train)):
        item = train[row]
        docs = train.examples(row)
        # the trained labels of a row are its examples' answer tokens, in order
        want = [t for d in docs for t, m in zip(ids[int(d)][1:].tolist(), mask[int(d)][1:].tolist()) if m]
        assert item["labels"][item["loss_mask"] == 1].tolist() == want
    assert sorted(int(d) for row in range(len(train)) for d in train.examples(row)) == [0, 1, 2]


def test_a_tokenizer_without_the_llama3_tokens_is_a_one_line_error(tmp_path, sp_model, capsys):
    path = write_jsonl(tmp_path / "f.jsonl", [{"inputs": "a cat", "targets": "four"}])
    tool = load_tool("preprocess_instructions")
    assert tool.main(["--input", path, "--format", "flan", "--tokenizer-model", sp_model, "--template", "llama3",
                      "--output-prefix", str(tmp_path / "f"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs the special token <|start_header_id|>" in err


@pytest.mark.parametrize("roles", [("user", "system"), ("user", "user"), ("assistant",), ("system", "assistant")])
def test_the_jinja_refuses_what_the_formats_refuse(llama3_folder, roles):
    with pytest.raises(Exception, match="alternating"):
        hf_chat_ids(llama3_folder, [{"role": role, "content": "a"} for role in roles])
