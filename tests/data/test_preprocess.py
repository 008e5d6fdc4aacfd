"""tools/preprocess_data.py: Megatron-readable output, skip accounting, strict mode, workers,
compressed inputs, atomic outputs."""
import filecmp
import gzip
import json

import numpy as np
import pytest
import zstandard

from megallama.data import preprocess as pp
from megallama.tokenizer import SentencePieceTokenizer
from tests.data.helpers import load_tool

preprocess_data = load_tool("preprocess_data")

mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")


@pytest.fixture()
def inputs(tmp_path, corpus):
    """Three files (plain, .gz, .zst) with good documents and one of each kind of bad line."""
    docs = [d for d in corpus[:1200] if d]
    lines = [json.dumps({"text": d, "title": d[:10] or "t"}).encode() + b"\n" for d in docs]
    bad = {
        3: b"{not json\n",
        10: json.dumps({"body": "no text key"}).encode() + b"\n",
        20: b'{"text": "caf\xe9 latin-1"}\n',
        30: json.dumps({"text": 17}).encode() + b"\n",
        40: b"\n",
        50: json.dumps({"text": ""}).encode() + b"\n",
        60: b'{"text": "lone surrogate \\ud800 escape"}\n',
    }
    for pos in sorted(bad, reverse=True):
        lines.insert(pos, bad[pos])
    third = len(lines) // 3
    (tmp_path / "part0.jsonl").write_bytes(b"".join(lines[:third]))
    with gzip.open(tmp_path / "part1.jsonl.gz", "wb") as f:
        f.write(b"".join(lines[third:2 * third]))
    (tmp_path / "part2.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines[2 * third:])))
    return docs


def run(tmp_path, tiny_tokenizer, name, *extra):
    return preprocess_data.main(["--input", str(tmp_path / "part*"), "--output-prefix", str(tmp_path / name),
                                 "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", tiny_tokenizer,
                                 "--no-progress", *extra])


def test_output_is_megatron_readable_and_skips_are_counted(tmp_path, tiny_tokenizer, inputs, capsys):
    assert run(tmp_path, tiny_tokenizer, "out", "--append-eod", "--log-interval", "100") == 0
    report = capsys.readouterr().out
    assert f"wrote {len(inputs):,} documents" in report
    for reason in ["1 broken JSON", "1 missing key 'text'", "2 invalid UTF-8", "1 key 'text' is not a string",
                   "1 blank line", "1 empty 'text'"]:
        assert reason in report
    ds = mcore.IndexedDataset(str(tmp_path / "out_text_document"))
    tok = SentencePieceTokenizer(tiny_tokenizer)
    assert len(ds) == len(inputs) and ds.index.dtype == np.uint16
    reference = tok.sp.encode(inputs)
    for i in range(len(ds)):
        assert ds[i].tolist() == reference[i] + [tok.eos_id]


def test_two_workers_write_the_same_bytes_and_keys_get_own_outputs(tmp_path, tiny_tokenizer, inputs):
    assert run(tmp_path, tiny_tokenizer, "one", "--json-keys", "text", "title") == 0
    assert run(tmp_path, tiny_tokenizer, "two", "--json-keys", "text", "title", "--workers", "2") == 0
    for key in ("text", "title"):
        for ext in (".bin", ".idx"):
            assert filecmp.cmp(tmp_path / f"one_{key}_document{ext}", tmp_path / f"two_{key}_document{ext}", shallow=False)
    titles = mcore.IndexedDataset(str(tmp_path / "one_title_document"))
    assert len(titles) == len(inputs)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_strict_fails_naming_file_and_line(tmp_path, tiny_tokenizer, inputs, capsys, workers):
    assert run(tmp_path, tiny_tokenizer, "strict", "--strict", "--workers", workers) == 1
    assert "part0.jsonl:4: broken JSON" in capsys.readouterr().err
    assert not any(p.name.startswith("strict") for p in tmp_path.iterdir())


def test_a_crash_leaves_no_output(tmp_path, tiny_tokenizer, inputs, monkeypatch):
    calls = []
    real = pp._encode_batch

    def failing(task):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(task)

    monkeypatch.setattr(pp, "_encode_batch", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pp.preprocess([str(tmp_path / "part*")], str(tmp_path / "crash"), tokenizer_model=tiny_tokenizer,
                      progress=False, batch_lines=100)
    assert len(calls) == 2
    assert not any(p.name.startswith("crash") for p in tmp_path.iterdir())


def test_missing_input_is_a_clear_error(tmp_path, tiny_tokenizer, capsys):
    assert preprocess_data.main(["--input", str(tmp_path / "nothing*.jsonl"), "--output-prefix", str(tmp_path / "x"),
                                 "--tokenizer-model", tiny_tokenizer]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "matches no file" in err


@pytest.mark.faults
@pytest.mark.parametrize("suffix", ["gz", "zst"])
def test_a_truncated_compressed_input_is_a_one_line_error_naming_it(tmp_path, tiny_tokenizer, corpus, capsys, suffix):
    """Issue 19: the .zst reader returned the cut data silently (the .gz one raised a bare EOFError)."""
    data = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in corpus[:400] if d)
    compressed = gzip.compress(data) if suffix == "gz" else zstandard.ZstdCompressor().compress(data)
    (tmp_path / f"part0.jsonl.{suffix}").write_bytes(compressed[: len(compressed) * 2 // 3])
    assert run(tmp_path, tiny_tokenizer, "out") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"part0.jsonl.{suffix}" in err and "truncated" in err
    assert not (tmp_path / "out_text_document.bin").exists()
