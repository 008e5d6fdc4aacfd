"""Issue 19, items 4 and 7: a --load naming nothing is an error (unless it is the --save folder or
--allow-no-checkpoint says so), a run never rewinds --save's tracker without --rewind-save, and a
token id outside the vocabulary stops the run in one line before the model is built."""
import numpy as np
import pytest

from megallama.data.indexed import IndexedDatasetWriter
from megallama.pretrain import main
from megallama.checkpoint import storage as ckpt
from megallama.training import loop
from tests.training.test_pretrain_cli import TINY, losses_of

pytestmark = pytest.mark.faults


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_mistyped_load_is_an_error_and_save_keeps_its_tracker(tmp_path, capsys):
    real = str(tmp_path / "real")
    assert main([*TINY, "--train-iters", "4", "--save", real]) == 0
    reel = str(tmp_path / "reel")
    assert main([*TINY, "--train-iters", "6", "--load", reel, "--save", real]) == 2
    assert one_error(capsys) == (f"megallama.pretrain: error: --load {reel} does not exist; to train from scratch "
                                 "drop --load, give --load the --save folder, or add --allow-no-checkpoint")
    assert ckpt.read_tracker(real) == 4
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*TINY, "--train-iters", "2", "--load", str(empty), "--save", str(tmp_path / "new")]) == 2
    assert "holds no checkpoint" in one_error(capsys)
    assert main([*TINY, "--train-iters", "2", "--load", str(empty), "--allow-no-checkpoint"]) == 0
    assert "training from scratch" in capsys.readouterr().out


def test_load_of_the_save_folder_resumes_or_starts(tmp_path, capsys):
    folder = str(tmp_path / "run")
    assert main([*TINY, "--train-iters", "2", "--load", folder, "--save", folder]) == 0
    assert main([*TINY, "--train-iters", "3", "--load", folder, "--save", folder]) == 0
    assert sorted(losses_of(capsys.readouterr().out)) == [1, 2, 3]  # the second run resumed at 2
    assert ckpt.read_tracker(folder) == 3


def test_a_run_never_rewinds_save_without_the_flag(tmp_path, capsys):
    folder = str(tmp_path / "run")
    assert main([*TINY, "--train-iters", "4", "--save", folder, "--save-interval", "2"]) == 0
    capsys.readouterr()
    # A fresh run into the folder, and a restart from an earlier step, would both move it back.
    assert main([*TINY, "--train-iters", "4", "--save", folder]) == 2
    assert one_error(capsys) == (f"megallama.pretrain: error: --save {folder} already holds iteration 4 and this "
                                 "run starts at iteration 0: its saves would move that tracker back and replace "
                                 "later checkpoints; give another --save, or --rewind-save to do it on purpose")
    assert main([*TINY, "--train-iters", "3", "--load", folder, "--ckpt-step", "2", "--save", folder]) == 2
    assert "starts at iteration 2" in one_error(capsys)
    assert ckpt.read_tracker(folder) == 4
    assert main([*TINY, "--train-iters", "3", "--load", folder, "--ckpt-step", "2", "--save", folder,
                 "--rewind-save"]) == 0
    assert ckpt.read_tracker(folder) == 3


def test_a_ckpt_step_never_saved_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    folder = str(tmp_path / "run")
    assert main([*TINY, "--train-iters", "4", "--save", folder, "--save-interval", "2"]) == 0
    capsys.readouterr()
    built = []
    monkeypatch.setattr(loop, "build_datasets", lambda *a: built.append(1))  # it came after the data and model
    assert main([*TINY, "--train-iters", "6", "--load", folder, "--ckpt-step", "3"]) == 2
    assert one_error(capsys) == (f"megallama.pretrain: error: --ckpt-step 3: no checkpoint of iteration 3 in "
                                 f"{folder} ({ckpt.checkpoint_dir(folder, 3)} does not exist; saved iterations: 2, 4)")
    assert built == []


@pytest.mark.parametrize("changed, message", [
    (["--rotary-base", "500000"], "has rope_theta 10000.0, the flags give 500000.0"),
    (["--norm-epsilon", "1e-2"], "has norm_epsilon 1e-06, the flags give 0.01"),
])
def test_resuming_under_another_model_is_one_line_before_any_work(changed, message, tmp_path, capsys, monkeypatch):
    # A new rotary base or norm epsilon loaded the weights and trained another model without a word
    # (a new shape: tests/training/test_pretrain_cli.py).
    folder = str(tmp_path / "run")
    assert main([*TINY, "--train-iters", "2", "--save", folder]) == 0
    capsys.readouterr()
    built = []
    monkeypatch.setattr(loop, "build_datasets", lambda *a: built.append(1))
    assert main([*TINY, *changed, "--train-iters", "4", "--load", folder]) == 2
    assert one_error(capsys) == (f"megallama.pretrain: error: --load {folder} (iteration 2) {message}: resume with "
                                 "the flags it was trained with")
    assert built == []


def test_an_output_folder_through_a_file_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    # --save failed at the first save with a traceback, the iterations before it trained and lost;
    # --tensorboard-dir with a traceback during set-up.
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    built = []
    monkeypatch.setattr(loop, "build_datasets", lambda *a: built.append(1))
    for flag, path in (("--save", str(a_file)), ("--save", str(a_file / "run")), ("--tensorboard-dir", str(a_file))):
        assert main([*TINY, "--train-iters", "2", flag, path]) == 2
        assert one_error(capsys) == f"megallama.pretrain: error: {flag} {path}: {a_file} is a file, not a folder"
    assert built == []


def test_token_id_outside_the_vocabulary_is_one_line_before_the_model(tmp_path, capsys, monkeypatch):
    prefix = str(tmp_path / "other_vocab_text_document")
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for start in range(0, 2000, 40):
            writer.add_document(np.arange(start, start + 40) % 70)  # ids up to 69; --vocab-size is 64
    built = []
    monkeypatch.setattr(loop, "build_model", lambda *a: built.append(1))
    flags = [f for f in TINY if f != "--mock-data"]
    assert main([*flags, "--train-iters", "2", "--data-path", prefix, "--split", "100,0,0",
                 "--data-cache-path", str(tmp_path / "cache")]) == 1
    err = one_error(capsys)
    assert err.startswith("megallama.pretrain: error: sample ") and "holds token id 6" in err
    assert "outside --vocab-size 64 (was the data tokenized with another tokenizer?)" in err
    assert built == []
