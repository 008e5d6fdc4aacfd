"""The chunk-cached batch encoder gives exactly SentencePiece's ids; the trained tokenizer has
LLaMA's settings; tools/train_tokenizer.py reads JSONL."""
import json

import numpy as np
import pytest
import sentencepiece as spm

from tests.data.helpers import load_tool, varied_text
from megallama.tokenizer import NullTokenizer, SentencePieceTokenizer, build_tokenizer, train_sentencepiece


def assert_batch_equals_sentencepiece(tok, docs, append_eod=False, batch=257):
    reference = tok.sp.encode(docs)
    for lo in range(0, len(docs), batch):
        flat, counts = tok.encode_batch(docs[lo:lo + batch], append_eod=append_eod)
        assert flat.dtype == np.int32 and counts.dtype == np.int64 and len(counts) == len(docs[lo:lo + batch])
        pos = 0
        for i, n in enumerate(counts.tolist()):
            want = reference[lo + i] + ([tok.eos_id] if append_eod else [])
            got = flat[pos:pos + n].tolist()
            assert got == want, f"document {lo + i} {docs[lo + i]!r}: {got} != {want}"
            pos += n
        assert pos == flat.size


def test_batch_encode_identical_to_sentencepiece(tiny_tokenizer):
    tok = SentencePieceTokenizer(tiny_tokenizer)
    assert tok.supports_chunk_cache
    docs = varied_text(np.random.default_rng(99), 6000, rare=True)  # unseen chunks and characters too
    assert_batch_equals_sentencepiece(tok, docs, append_eod=True)
    assert len(tok._cache) > 1000
    assert_batch_equals_sentencepiece(tok, docs[::-1])  # second pass: everything from the cache


def test_batch_encode_runs_sentencepiece_on_the_threads_asked_for(tiny_tokenizer):
    """preprocess asks for one thread in each of several workers, which already share the cores."""
    tok = SentencePieceTokenizer(tiny_tokenizer)
    docs = varied_text(np.random.default_rng(7), 300, rare=True)  # chunks joined and chunks alone
    threads = []

    class Recording:
        def __init__(self, sp):
            self._sp = sp

        def encode(self, texts, num_threads="not given"):
            threads.append(num_threads)
            return self._sp.encode(texts, num_threads=None if num_threads == "not given" else num_threads)

    tok.sp = Recording(tok.sp)
    tok.encode_batch(docs, num_threads=1)
    assert len(threads) >= 2 and set(threads) == {1}


def test_newline_is_a_barrier_only_when_no_piece_holds_it(tmp_path, tiny_tokenizer, corpus):
    barriers = SentencePieceTokenizer(tiny_tokenizer).barriers
    assert "\n" in barriers  # trained on lines: no piece holds a newline
    assert set("0123456789") <= set(barriers)  # split_digits: no piece holds a digit and more
    # trained on whole documents, pieces may hold newlines and tabs: those are then no barriers
    model = train_sentencepiece([d for d in corpus[:1500] if d.strip()], 600, str(tmp_path / "docs"),
                                num_threads=2, max_sentence_length=100_000)
    tok = SentencePieceTokenizer(model)
    multi = [tok.id_to_piece(i) for i in range(tok.vocab_size) if len(tok.id_to_piece(i)) > 1]
    for c in "\n\t\r":
        assert (c in tok.barriers) == (not any(c in p for p in multi))
    assert_batch_equals_sentencepiece(tok, varied_text(np.random.default_rng(8), 1500, rare=True))


def test_batch_encode_exact_with_a_tiny_cache_that_keeps_clearing(tiny_tokenizer):
    tok = SentencePieceTokenizer(tiny_tokenizer, cache_entries=40)
    assert_batch_equals_sentencepiece(tok, varied_text(np.random.default_rng(5), 800, rare=True), batch=31)


@pytest.mark.parametrize("overrides", [
    {"allow_whitespace_only_pieces": False},
    {"add_dummy_prefix": False},
    {"split_digits": False, "split_by_unicode_script": False},
    {"byte_fallback": False},  # unknown characters become unk (and runs of them merge)
    # SentencePiece's defaults: NFKC and collapsed spaces -> the chunk cache is not exact, falls back
    {"normalization_rule_name": "nmt_nfkc", "remove_extra_whitespaces": True},
])
def test_other_model_settings_stay_exact(tmp_path, corpus, overrides):
    lines = [line for doc in corpus[:1500] for line in doc.split("\n") if line.strip()]
    model = train_sentencepiece(lines, 600, str(tmp_path / "m"), num_threads=2, **overrides)
    tok = SentencePieceTokenizer(model)
    assert tok.supports_chunk_cache == ("normalization_rule_name" not in overrides)
    assert_batch_equals_sentencepiece(tok, varied_text(np.random.default_rng(7), 1500, rare=True), append_eod=True)


def test_trained_tokenizer_has_llamas_settings(tiny_tokenizer):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(open(tiny_tokenizer, "rb").read())
    t, n = proto.trainer_spec, proto.normalizer_spec
    # the values in Meta's released tokenizer.model
    assert t.model_type == t.BPE and t.split_digits and t.byte_fallback and t.allow_whitespace_only_pieces
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, -1)
    assert n.name == "identity" and n.add_dummy_prefix and not n.remove_extra_whitespaces

    tok = SentencePieceTokenizer(tiny_tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 600)
    pieces = [tok.id_to_piece(i) for i in tok.encode("year 20231 costs 4567")]
    digits = [p.lstrip("\u2581") for p in pieces if any(c.isdigit() for c in p)]
    assert all(len(p) == 1 for p in digits) and "".join(digits) == "202314567"
    rare = "龘"  # not in the training text: falls back to its three UTF-8 bytes
    assert [tok.id_to_piece(i) for i in tok.encode(rare)][-3:] == ["<0xE9>", "<0xBE>", "<0x98>"]
    for text in ["héllo  wörld\n\ttab", "天地玄黄 龘 😀", "  leading and trailing  "]:
        assert tok.decode(tok.encode(text)) == text


def test_a_model_from_sentencepiece_directly_loads(tmp_path, corpus):
    # a model written by SentencePiece's own trainer with Meta's settings (as Meta's tokenizer.model)
    lines = [line for doc in corpus[:800] for line in doc.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "meta"), vocab_size=600,
                                   model_type="bpe", split_digits=True, byte_fallback=True, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    tok = build_tokenizer("Llama2Tokenizer", str(tmp_path / "meta.model"))
    assert tok.supports_chunk_cache and tok.vocab_size == 600
    assert_batch_equals_sentencepiece(tok, corpus[800:1600])


def test_null_tokenizer():
    tok = NullTokenizer(100)
    assert tok.encode("5 17  3\n") == [5, 17, 3] and tok.decode([5, 17]) == "5 17" and tok.eos_id == 99
    flat, counts = tok.encode_batch(["1 2", "3"], append_eod=True)
    assert flat.tolist() == [1, 2, 99, 3, 99] and counts.tolist() == [3, 2]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("100")
    with pytest.raises(ValueError, match="unknown --tokenizer-type"):
        build_tokenizer("GPT2BPETokenizer")


def test_train_tokenizer_tool_reads_jsonl(tmp_path, corpus):
    import zstandard

    train_tokenizer = load_tool("train_tokenizer")
    raw = "".join(json.dumps({"content": d}) + "\n" for d in corpus[:1500]) + "not json\n"
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw.encode()))
    prefix = tmp_path / "out" / "tok"
    assert train_tokenizer.main(["--input", str(tmp_path / "*.jsonl.zst"), "--json-keys", "content",
                                 "--vocab-size", "500", "--output-prefix", str(prefix),
                                 "--input-sentence-size", "2000", "--num-threads", "2"]) == 0
    assert (tmp_path / "out" / "tok.vocab").exists()
    tok = SentencePieceTokenizer(str(prefix) + ".model")
    assert tok.vocab_size == 500 and tok.supports_chunk_cache
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tok.model", "tok.vocab"]


def test_train_tokenizer_tool_errors_are_one_line(tmp_path, corpus, capsys):
    """A missing input, a wrong --json-keys, a bad line under --strict and an out-of-range setting
    were Python tracebacks (or SentencePiece's "[!sentences_.empty()]")."""
    train_tokenizer = load_tool("train_tokenizer")
    docs = [d for d in corpus[:200] if d]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + "{broken\n")
    base = ["--vocab-size", "300", "--output-prefix", str(tmp_path / "out" / "tok")]
    for argv, message in [(["--input", str(tmp_path / "none*.jsonl")], "matches no file"),
                          (["--input", str(tmp_path / "a.jsonl"), "--json-keys", "body"],
                           f"no text to train on in --input (key body; skipped lines: {len(docs)} missing key 'body', "
                           "1 broken JSON)"),
                          (["--input", str(tmp_path / "a.jsonl"), "--strict"], f"a.jsonl:{len(docs) + 1}: broken JSON")]:
        assert train_tokenizer.main(argv + base) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    with pytest.raises(SystemExit) as exit_:
        train_tokenizer.main(["--input", str(tmp_path / "a.jsonl"), "--character-coverage", "2"] + base)
    assert exit_.value.code == 2 and "--character-coverage must be within [0.98, 1]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "afile").write_text("")  # was "[Errno 17] File exists: '…/afile'"
    assert train_tokenizer.main(["--input", str(tmp_path / "a.jsonl"), "--vocab-size", "300", "--output-prefix",
                                 str(tmp_path / "afile" / "tok")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: --output-prefix: cannot make the folder {tmp_path / 'afile'}: "
                                               "a file is in the way")


def test_a_folder_as_sentencepiece_model_is_named_a_folder(tmp_path):
    """It was "tokenizer model DIR does not exist", for a folder that exists."""
    with pytest.raises(FileNotFoundError, match="is a folder, not a SentencePiece .model file .*HuggingFaceTokenizer"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path))
