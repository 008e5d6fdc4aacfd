"""--tokenizer-type HuggingFaceTokenizer: a LLaMA-3-style tokenizer folder (byte-level BPE in
tokenizer.json, bos/eos in tokenizer_config.json), built offline here, gives exactly the ids of
transformers' AutoTokenizer, decodes back to the text, and preprocesses into a readable dataset."""
import json

import numpy as np
import pytest

from megallama.data.indexed import IndexedDataset
from megallama.tokenizer import HuggingFaceTokenizer, build_tokenizer
from tests.data.helpers import load_tool, varied_text

preprocess_data = load_tool("preprocess_data")

# LLaMA-3's pre-tokenizer regex (from its tokenizer.json): contractions, letter runs, numbers in
# groups of at most three digits, punctuation runs, newlines, whitespace.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# LLaMA-3-instruct's chat template tokens (the llama3 finetuning template)
CHAT_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
EDGE_CASES = [
    "", " ", "café naïve Ærø", "日本語の文章と中文混合", "emoji 🦙🚀👩‍👩‍👧 flags 🇫🇷", "12345678901234567890",
    "3.14159 and 1,000,000", "    four spaces\tand\ttabs\t\t", "lines\n\n\nand\r\nwindows\n", "trailing   ",
    "it's they'RE we'll", "\u3000ideographic\u3000space", "zero\u200bwidth \x00 nul", "a literal <|end_of_text|> token",
]


def write_llama3_style_folder(folder, corpus, tokenizer_config=None, special_tokens_map=None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens([BOS, EOS, "<|reserved_special_token_0|>", *CHAT_TOKENS])
    # LLaMA-3's post-processor: AutoTokenizer's default encode prepends BOS
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, tok.token_to_id(BOS))])])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if tokenizer_config is None:
        tokenizer_config = {"bos_token": BOS, "eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast",
                            "model_max_length": 131072}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if special_tokens_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    return str(folder)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, corpus):
    return write_llama3_style_folder(tmp_path_factory.mktemp("hf") / "llama3", corpus[:800])


@pytest.fixture(scope="module")
def texts():
    # unseen characters too (byte-level BPE encodes any text)
    return EDGE_CASES + varied_text(np.random.default_rng(3), 400, rare=True)


def test_ids_are_autotokenizers(hf_folder, texts):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(hf_folder)
    tok = build_tokenizer("HuggingFaceTokenizer", hf_folder)
    assert isinstance(tok, HuggingFaceTokenizer)
    assert (tok.bos_id, tok.eos_id) == (reference.bos_token_id, reference.eos_token_id)
    assert tok.eod == tok.pad_id == tok.eos_id and tok.vocab_size == len(reference) == 606
    flat, counts = tok.encode_batch(texts, append_eod=True)
    assert flat.dtype == np.int32 and counts.dtype == np.int64 and counts.sum() == flat.size
    for text, ids in zip(texts, np.split(flat, np.cumsum(counts)[:-1])):
        want = reference.encode(text, add_special_tokens=False)
        assert tok.encode(text) == want, text
        assert ids.tolist() == want + [tok.eos_id], text
        # AutoTokenizer's default adds the post-processor's BOS, which our callers prepend themselves
        assert reference.encode(text) == [tok.bos_id] + want


def test_decode_round_trips(hf_folder, texts):
    tok = HuggingFaceTokenizer(hf_folder)
    for text in texts:
        if "<|end_of_text|>" not in text:  # a special token in the text is dropped, as SentencePiece's control ids
            assert tok.decode([tok.bos_id] + tok.encode(text) + [tok.eos_id]) == text
    assert tok.id_to_piece(tok.bos_id) == BOS


@pytest.mark.parametrize("current", [False, True])
def test_special_tokens_resolve_as_in_transformers(tmp_path, corpus, current):
    """special_tokens_map.json overrides tokenizer_config.json only in folders saved before
    transformers wrote added_tokens_decoder; no bos or pad named means eos."""
    transformers = pytest.importorskip("transformers")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": BOS}
    if current:
        config["added_tokens_decoder"] = {str(600 + i): {"content": token, "special": True}
                                          for i, token in enumerate([BOS, EOS])}
    folder = write_llama3_style_folder(tmp_path / "tok", corpus[:200], tokenizer_config=config,
                                       special_tokens_map={"eos_token": {"content": EOS, "special": True}})
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    tok = HuggingFaceTokenizer(folder)
    assert tok.eos_id == reference.eos_token_id == tok.tokenizer.token_to_id(BOS if current else EOS)
    assert tok.bos_id == tok.pad_id == tok.eos_id


def test_a_folder_naming_no_eos_is_an_error(tmp_path, corpus):
    folder = write_llama3_style_folder(tmp_path / "tok", corpus[:200], tokenizer_config={"bos_token": BOS})
    with pytest.raises(ValueError, match="names no eos_token"):
        HuggingFaceTokenizer(folder)


def run(tmp_path, tokenizer_model, *extra):
    return preprocess_data.main(["--input", str(tmp_path / "docs.jsonl"), "--output-prefix", str(tmp_path / "out"),
                                 "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_model,
                                 "--no-progress", *extra])


def test_preprocessed_documents_decode_back(tmp_path, hf_folder, texts):
    docs = [t for t in texts if t and "<|end_of_text|>" not in t]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert run(tmp_path, hf_folder, "--append-eod") == 0
    tok = HuggingFaceTokenizer(hf_folder)
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    assert len(ds) == len(docs)
    for i, doc in enumerate(docs):
        ids = ds[i].tolist()
        assert ids == tok.encode(doc) + [tok.eod] and tok.decode(ids) == doc


def test_a_folder_without_tokenizer_json_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (tmp_path / "empty").mkdir()
    assert run(tmp_path, str(tmp_path / "empty")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'empty'} has no tokenizer.json" in err


def test_pretraining_flags_take_the_folder_and_its_vocabulary(tmp_path, hf_folder):
    from megallama.training.arguments import ConfigError, parse_args

    flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
             "--untie-embeddings-and-output-weights",
             "--train-iters", "10", "--lr-warmup-iters", "2", "--mock-data", "--tokenizer-type", "HuggingFaceTokenizer"]
    config = parse_args([*flags, "--tokenizer-model", hf_folder], env={})
    assert config.model.vocab_size == 606 and config.data.tokenizer_type == "HuggingFaceTokenizer"
    with pytest.raises(ConfigError, match="has 606 tokens, more than --vocab-size 600"):
        parse_args([*flags, "--tokenizer-model", hf_folder, "--vocab-size", "600"], env={})
    with pytest.raises(ConfigError, match=f"tokenizer folder {tmp_path} has no tokenizer.json"):
        parse_args([*flags, "--tokenizer-model", str(tmp_path)], env={})
    with pytest.raises(ConfigError, match="HuggingFaceTokenizer needs --tokenizer-model"):
        parse_args(flags, env={})


def test_streamed_generation_text_is_the_text(hf_folder):
    from megallama.inference.text import IncrementalDecoder

    tok = HuggingFaceTokenizer(hf_folder)
    text = " naïve 日本語 🦙👩‍👩‍👧 12345\n\tend"
    decoder = IncrementalDecoder(tok, [tok.bos_id] + tok.encode("prompt:"))
    streamed = "".join(decoder.add(i) for i in tok.encode(text)) + decoder.flush()
    assert streamed == decoder.text() == text
