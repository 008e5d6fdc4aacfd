"""tools/preprocess_data.py: Megatron-readable output, skip accounting, strict mode, workers,
compressed inputs, atomic outputs."""
import filecmp
import gzip
import json
import os
import time

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


def test_unwritable_outputs_and_a_bad_model_are_one_line_errors_before_any_work(tmp_path, tiny_tokenizer, inputs,
                                                                                capsys, monkeypatch):
    """An output prefix below a file, an output that is a folder (found only by the final rename)
    and a file that is no tokenizer model were tracebacks."""
    (tmp_path / "afile").write_text("")
    (tmp_path / "dir_text_document.bin").mkdir()
    monkeypatch.setattr(pp, "iter_line_batches", lambda *a: pytest.fail("work started"))
    for name, message in [("afile/out", "a file is in the way of the folder"),
                          ("dir", "dir_text_document.bin: it is a folder")]:
        assert run(tmp_path, tiny_tokenizer, name) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    instructions = load_tool("preprocess_instructions")
    (tmp_path / "alpaca.jsonl").write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n")
    assert instructions.main(["--input", str(tmp_path / "alpaca.jsonl"), "--format", "alpaca", "--tokenizer-model",
                              str(tmp_path / "alpaca.jsonl"), "--output-prefix", str(tmp_path / "sft"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "alpaca.jsonl" in err, err


@pytest.mark.parametrize("suffix", ["bz2", "xz"])
def test_the_progress_bar_has_no_byte_total_for_any_compressed_input(tmp_path, tiny_tokenizer, corpus, monkeypatch, suffix):
    """.bz2 and .xz inputs got their size on disk as the total of a bar counting decompressed bytes."""
    import bz2
    import lzma

    data = b"".join(json.dumps({"text": d}).encode() + b"\n" for d in corpus[:50] if d)
    (tmp_path / f"part0.jsonl.{suffix}").write_bytes((bz2 if suffix == "bz2" else lzma).compress(data))
    totals = []
    real_tqdm = pp.tqdm
    monkeypatch.setattr(pp, "tqdm", lambda *a, **kw: totals.append(kw["total"]) or real_tqdm(*a, **kw))
    pp.preprocess([str(tmp_path / f"part0.jsonl.{suffix}")], str(tmp_path / "out"), "SentencePieceTokenizer",
                  tiny_tokenizer, progress=False)
    assert totals == [None]


def test_inputs_named_twice_are_read_once_and_many_files_expand_fast(tmp_path, monkeypatch):
    """./a.jsonl beside a.jsonl was tokenized twice; 30,000 files took 10 s to list (a list's `in`)."""
    from megallama.data import jsonl

    (tmp_path / "a.jsonl").write_text("{}\n")
    assert jsonl.expand_inputs([str(tmp_path / "*.jsonl"), os.path.join(str(tmp_path), ".", "a.jsonl")]) == [
        str(tmp_path / "a.jsonl")]
    names = [f"/data/part-{i:06d}.jsonl" for i in range(50_000)]
    monkeypatch.setattr(jsonl.glob, "glob", lambda pattern: list(names))
    monkeypatch.setattr(jsonl.os.path, "isfile", lambda path: True)
    monkeypatch.setattr(jsonl.os.path, "realpath", lambda path: path)
    start = time.perf_counter()
    assert jsonl.expand_inputs(["/data/*.jsonl"]) == names
    assert time.perf_counter() - start < 5  # 0.02 s; the quadratic scan took 14 s


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_wrong_json_key_is_an_error_not_an_empty_dataset(tmp_path, tiny_tokenizer, inputs, capsys, workers):
    """Every line lacking the key wrote an empty dataset and exited 0 with only a warning."""
    assert run(tmp_path, tiny_tokenizer, "wrong", "--json-keys", "nope", "--workers", workers) == 1
    err = capsys.readouterr().err.strip()
    lines = len(inputs) + 7  # the documents and the seven bad lines
    assert len(err.splitlines()) == 1 and f"all {lines:,} input lines were skipped" in err and "--json-keys nope" in err, err
    assert not any(p.name.startswith("wrong") for p in tmp_path.iterdir())
    from megallama.executors import LocalExecutor

    with LocalExecutor(1) as executor, pytest.raises(ValueError, match="check --json-keys nope; nothing written"):
        pp.preprocess([str(tmp_path / "part*")], str(tmp_path / "wrong"), tokenizer_model=tiny_tokenizer,
                      json_keys=["nope"], progress=False, executor=executor)  # the --executor ray path, run here
    assert not any(p.name.startswith("wrong") for p in tmp_path.iterdir())
    (tmp_path / "empty.jsonl").write_bytes(b"")  # an empty input still gives an (empty) dataset, with a warning
    summary = pp.preprocess([str(tmp_path / "empty.jsonl")], str(tmp_path / "empty"), tokenizer_model=tiny_tokenizer,
                            progress=False)
    assert summary.documents == 0 and "warning: no documents" in pp.format_summary(summary)


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, tiny_tokenizer, inputs, capsys, monkeypatch):
    """It was a traceback (the outputs, renamed into place only when complete, were already safe)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    message = f"interrupted: nothing written to {tmp_path / 'out'}_*_document.{{bin,idx}}; rerun the command"
    monkeypatch.setattr(preprocess_data, "preprocess", interrupted)
    assert run(tmp_path, tiny_tokenizer, "out") == 130
    assert capsys.readouterr().err.strip() == message
    instructions = load_tool("preprocess_instructions")
    monkeypatch.setattr(instructions, "preprocess_instructions", interrupted)
    assert instructions.main(["--input", str(tmp_path / "part0.jsonl"), "--format", "alpaca", "--tokenizer-model",
                              tiny_tokenizer, "--output-prefix", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip() == message
