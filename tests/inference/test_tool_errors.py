"""User errors in tools/generate.py, tools/evaluate.py and tools/convert_checkpoint.py: one line
naming the problem and a non-zero exit, never a traceback; nothing written where it would mix
with what is there."""
import os

import pytest

from megallama.checkpoint import convert_checkpoint
from megallama.checkpoint import storage as ckpt
from tests.inference.conftest import load_tool, random_hf_model, tiny_config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, sp_model):
    """An HF folder with its tokenizer, the same model as a megallama save folder, and a model whose
    vocabulary (300) is smaller than the tokenizer's 320 pieces."""
    root = tmp_path_factory.mktemp("tool_errors")
    raw, hf, ours, small = (str(root / name) for name in ("raw", "hf", "megallama", "small_vocab"))
    random_hf_model(tiny_config()).save_pretrained(raw)
    convert_checkpoint(raw, hf, "hf", tokenizer_model=sp_model, progress=False)
    convert_checkpoint(raw, ours, "megallama", progress=False)
    random_hf_model(tiny_config(vocab_size=300)).save_pretrained(small)
    return {"hf": hf, "megallama": ours, "small_vocab": small}


def _error_line(capsys, err: str | None = None) -> str:
    """The one line a refused command printed on stderr."""
    err = capsys.readouterr().err if err is None else err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _damaged_copy(folder: str, tmp_path) -> str:
    damaged = str(tmp_path / "damaged")
    convert_checkpoint(folder, damaged, "megallama", progress=False)
    rank_file = os.path.join(ckpt.checkpoint_dir(damaged, 0), "rank_00000.pt")
    with open(rank_file, "r+b") as f:
        f.seek(os.path.getsize(rank_file) // 2)
        f.write(b"\xff\x00\xff\x00")
    return damaged


def test_generate_refuses_bad_input_in_one_line(checkpoints, sp_model, tmp_path, capsys):
    cli = load_tool("generate")
    greedy = ["--greedy", "--max-new-tokens", "5"]
    # a prompt that leaves no room for a new token in the model's 96 positions (was a ValueError
    # traceback from the cache); a shorter one gets fewer new tokens instead (tests/inference/test_tools.py)
    assert cli.main(["--load", checkpoints["hf"], "--prompt", "the cat " * 60, *greedy]) == 1
    out, err = capsys.readouterr()
    line = _error_line(capsys, err)
    assert "leaves no room for a new token" in line and "max_position_embeddings=96" in line
    assert out == ""  # refused before the prompt is echoed
    for chat in ([], ["--chat"]):
        assert cli.main(["--load", checkpoints["hf"], "--prompt", "the cat", "--prompt", "the cat " * 60,
                         *chat, *greedy]) == 1
        assert "leaves no room for a new token" in _error_line(capsys)

    assert cli.main(["--load", checkpoints["hf"], "--prompt-file", str(tmp_path / "none.txt"), *greedy]) == 2
    assert "--prompt-file" in _error_line(capsys)
    # a tokenizer with more pieces than the model embeds (was an IndexError inside the embedding)
    assert cli.main(["--load", checkpoints["small_vocab"], "--tokenizer-model", sp_model,
                     "--prompt", "cat", *greedy]) == 1
    assert "has 320 tokens but the model's vocabulary holds 300" in _error_line(capsys)
    not_a_model = tmp_path / "prompts.txt"
    not_a_model.write_text("the cat\n")
    assert cli.main(["--load", checkpoints["hf"], "--tokenizer-model", str(not_a_model),
                     "--prompt", "cat", *greedy]) == 1
    assert f"cannot read tokenizer model {not_a_model}" in _error_line(capsys)
    broken = tmp_path / "broken_tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    assert cli.main(["--load", checkpoints["hf"], "--tokenizer-model", str(broken), "--prompt", "cat", *greedy]) == 1
    assert f"cannot read tokenizer model {broken}" in _error_line(capsys)
    # the checksum check's CheckpointError (was a traceback)
    damaged = _damaged_copy(checkpoints["megallama"], tmp_path)
    assert cli.main(["--load", damaged, "--tokenizer-model", sp_model, "--prompt", "cat", *greedy]) == 1
    assert "is damaged" in _error_line(capsys)


def test_evaluate_refuses_bad_input_in_one_line(checkpoints, sp_model, tmp_path, capsys):
    cli = load_tool("evaluate")
    jsonl = tmp_path / "valid.jsonl"
    jsonl.write_text('{"text": "the cat sat on a mat"}\n')
    # a folder as --output is refused before the evaluation, not by a traceback after it
    assert cli.main(["--load", checkpoints["hf"], "--jsonl", str(jsonl), "--output", str(tmp_path)]) == 2
    assert "is a folder" in _error_line(capsys)
    assert cli.main(["--load", checkpoints["small_vocab"], "--tokenizer-model", sp_model, "--jsonl", str(jsonl)]) == 1
    assert "has 320 tokens but the model's vocabulary holds 300" in _error_line(capsys)
    damaged = _damaged_copy(checkpoints["megallama"], tmp_path)
    assert cli.main(["--load", damaged, "--tokenizer-model", sp_model, "--jsonl", str(jsonl)]) == 1
    assert "is damaged" in _error_line(capsys)


def test_convert_refuses_a_save_folder_that_holds_files(checkpoints, tmp_path, capsys):
    cli = load_tool("convert_checkpoint")
    training_save = checkpoints["megallama"]
    before = sorted(os.listdir(training_save))
    # converting into a save folder used to add iter_0000000 and move its tracker back to it
    assert cli.main(["--load", checkpoints["hf"], "--save", training_save, "--target-format", "megallama"]) == 2
    assert "give a new or empty folder" in _error_line(capsys)
    assert sorted(os.listdir(training_save)) == before
    meta = tmp_path / "meta"
    meta.mkdir()  # an empty folder is fine
    assert cli.main(["--load", checkpoints["hf"], "--save", str(meta), "--target-format", "meta"]) == 0
    # a second format written beside the first would leave a folder read as whichever is detected first
    assert cli.main(["--load", checkpoints["hf"], "--save", str(meta), "--target-format", "hf"]) == 2
    assert "params.json" in _error_line(capsys)
