"""A checkpoint the readers cannot use is one line naming the file and the problem: a Meta
``params.json`` that is not JSON or lacks an entry, a ``--load`` that is a file, a tokenizer with more
tokens than the model's vocabulary given to a conversion."""
import json
import os

import pytest

from megallama.checkpoint import convert_checkpoint, detect_format, open_checkpoint
from tests.inference.conftest import load_tool, random_hf_model, sp_model, tiny_config  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny HF folder, the same as a Meta folder, and an HF folder whose vocabulary (300) is smaller
    than the test tokenizer's 320 pieces."""
    root = tmp_path_factory.mktemp("reader_errors")
    hf, meta, small = (str(root / name) for name in ("hf", "meta", "small_vocab"))
    random_hf_model(tiny_config()).save_pretrained(hf)
    convert_checkpoint(hf, meta, "meta", progress=False)
    random_hf_model(tiny_config(vocab_size=300)).save_pretrained(small)
    return {"hf": hf, "meta": meta, "small_vocab": small}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _meta_copy(folders, tmp_path, params_text: str) -> str:
    folder = tmp_path / "meta"
    folder.mkdir()
    for name in os.listdir(folders["meta"]):
        if name != "params.json":
            os.symlink(os.path.join(folders["meta"], name), folder / name)
    (folder / "params.json").write_text(params_text)
    return str(folder)


def test_a_bad_params_json_names_the_file_and_the_problem(folders, tmp_path, capsys):
    with open(os.path.join(folders["meta"], "params.json")) as f:
        params = json.load(f)
    assert open_checkpoint(folders["meta"]).config.num_layers == params["n_layers"]
    # not JSON: was json's "Expecting value: line 1 column 1 (char 0)" without the file
    broken = _meta_copy(folders, tmp_path, "{not json")
    with pytest.raises(ValueError, match=r"meta/params\.json is not valid JSON \(Expecting"):
        open_checkpoint(broken)
    # a missing entry: was KeyError('n_layers'), printed by the tools as "error: 'n_layers'"
    os.remove(os.path.join(broken, "params.json"))
    del params["n_layers"]
    with open(os.path.join(broken, "params.json"), "w") as f:
        json.dump(params, f)
    with pytest.raises(ValueError, match=r"meta/params\.json lacks n_layers \(Meta's params\.json holds dim, "):
        open_checkpoint(broken)
    assert load_tool("convert_checkpoint").main(["--load", broken, "--save", str(tmp_path / "out"),
                                                 "--target-format", "hf"]) == 1
    assert f"{broken}/params.json lacks n_layers" in _error_line(capsys)
    with open(os.path.join(broken, "params.json"), "w") as f:
        json.dump([params], f)
    with pytest.raises(ValueError, match=r"params\.json holds a JSON list, not an object"):
        open_checkpoint(broken)


def test_load_of_a_file_says_it_is_a_file(folders, sp_model, tmp_path, capsys):
    # was "checkpoint folder tok.model does not exist", of a file that does
    with pytest.raises(ValueError, match=f"{sp_model} is a file, not a checkpoint folder"):
        detect_format(sp_model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_format(str(tmp_path / "none"))
    assert load_tool("generate").main(["--load", sp_model, "--prompt", "cat", "--greedy"]) == 1
    assert "is a file, not a checkpoint folder" in _error_line(capsys)


def test_convert_refuses_a_tokenizer_larger_than_the_vocabulary(folders, sp_model, tmp_path, capsys):
    # was stored without a check: the HF export's tokenizer then produced ids past its embedding
    save = str(tmp_path / "hf_out")
    with pytest.raises(ValueError, match="has 320 tokens but the model's vocabulary holds 300"):
        convert_checkpoint(folders["small_vocab"], save, "hf", tokenizer_model=sp_model, progress=False)
    assert not os.path.exists(save)  # refused before anything is written
    assert load_tool("convert_checkpoint").main(["--load", folders["small_vocab"], "--save", save,
                                                 "--target-format", "hf", "--tokenizer-model", sp_model]) == 1
    assert "has 320 tokens but the model's vocabulary holds 300" in _error_line(capsys)
    convert_checkpoint(folders["hf"], save, "hf", tokenizer_model=sp_model, progress=False)  # a fitting one is stored
    assert open_checkpoint(save).tokenizer_model() == os.path.join(save, "tokenizer.model")
