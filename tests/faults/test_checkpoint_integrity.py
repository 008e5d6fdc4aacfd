"""Issue 19, items 3 and 7: a checkpoint with flipped bytes, a truncated rank file or a broken
metadata.json is a one-line error naming the file, the iteration and the way back (--ckpt-step),
never a silent load; tools/verify_checkpoint.py finds the same without a model; checkpoints
written before checksums still load; temporaries of a killed save are removed."""
import importlib.util
import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

from megallama.pretrain import main
from megallama.checkpoint import storage as ckpt
from tests.training.test_pretrain_cli import TINY, losses_of

pytestmark = pytest.mark.faults

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("verify_checkpoint_tool", os.path.join(ROOT, "tools", "verify_checkpoint.py"))
verify_checkpoint_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(verify_checkpoint_tool)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A serial run saved at iterations 2 and 4, and its losses 5..6 when resumed from 4."""
    import io
    from contextlib import redirect_stdout

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = str(tmp_path_factory.mktemp("saved"))
    out = io.StringIO()
    with redirect_stdout(out):
        assert main([*TINY, "--train-iters", "4", "--save", root, "--save-interval", "2"]) == 0
        out.truncate(0)
        assert main([*TINY, "--train-iters", "6", "--load", root]) == 0
    torch.set_num_threads(threads)
    return {"root": root, "resumed": losses_of(out.getvalue())}


def copy_of(saved, tmp_path) -> str:
    import shutil

    return shutil.copytree(saved["root"], str(tmp_path / "ckpt"))


def flip_bytes(path: str, count: int = 16) -> None:
    """Invert ``count`` bytes in the middle of the file's tensor data (not the zip structure)."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        middle = len(data) // 2
        data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
        f.seek(0)
        f.write(data)


def drop_checksums(root: str, iteration: int) -> None:
    """Make the checkpoint of ``iteration`` one written before checkpoints carried checksums."""
    path = os.path.join(ckpt.checkpoint_dir(root, iteration), ckpt.METADATA_FILENAME)
    with open(path) as f:
        document = json.load(f)
    del document["files"]
    with open(path, "w") as f:
        json.dump(document, f)


def load_error(root: str, capsys) -> str:
    assert main([*TINY, "--train-iters", "6", "--load", root]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_flipped_bytes_are_an_error_naming_file_iteration_and_way_back(saved, tmp_path, capsys):
    root = copy_of(saved, tmp_path)
    rank_file = os.path.join(ckpt.checkpoint_dir(root, 4), ckpt.rank_filename(0))
    flip_bytes(rank_file)
    err = load_error(root, capsys)
    assert err == (f"megallama.pretrain: error: checkpoint of iteration 4 is damaged: {rank_file} does not match "
                   "its SHA-256 in metadata.json (corrupted); the previous complete checkpoint is iteration 2: "
                   "resume from it with --ckpt-step 2")
    # The way back works.
    assert main([*TINY, "--train-iters", "3", "--load", root, "--ckpt-step", "2"]) == 0


def test_truncated_rank_file_is_an_error(saved, tmp_path, capsys):
    root = copy_of(saved, tmp_path)
    rank_file = os.path.join(ckpt.checkpoint_dir(root, 4), ckpt.rank_filename(0))
    with open(rank_file, "r+b") as f:
        f.truncate(os.path.getsize(rank_file) // 2)
    err = load_error(root, capsys)
    assert f"checkpoint of iteration 4 is damaged: {rank_file} has " in err and "(truncated or overwritten)" in err
    assert err.endswith("--ckpt-step 2")


def test_broken_metadata_is_an_error(saved, tmp_path, capsys):
    root = copy_of(saved, tmp_path)
    metadata = os.path.join(ckpt.checkpoint_dir(root, 4), ckpt.METADATA_FILENAME)
    with open(metadata, "r+") as f:
        f.truncate(100)
    err = load_error(root, capsys)
    assert err.startswith(f"megallama.pretrain: error: checkpoint of iteration 4 is damaged: {metadata} is "
                          "unreadable (JSONDecodeError")
    assert err.endswith("resume from it with --ckpt-step 2")


def test_without_an_earlier_checkpoint_the_message_says_so(saved, tmp_path, capsys):
    root = copy_of(saved, tmp_path)
    flip_bytes(os.path.join(ckpt.checkpoint_dir(root, 2), ckpt.rank_filename(0)))
    assert main([*TINY, "--train-iters", "3", "--load", root, "--ckpt-step", "2"]) == 1
    assert capsys.readouterr().err.strip().endswith(f"; no earlier complete checkpoint in {root}")


def test_a_checkpoint_written_before_checksums_still_loads(saved, tmp_path, capsys):
    root = copy_of(saved, tmp_path)
    drop_checksums(root, 4)
    assert main([*TINY, "--train-iters", "6", "--load", root]) == 0
    out = capsys.readouterr().out
    assert "written before checkpoints carried checksums: loading it unverified" in out
    assert losses_of(out) == saved["resumed"]
    report = ckpt.verify_checkpoint(root, 4)
    assert report.problems == [] and not report.checksummed  # nothing recorded: every file loads
    rank_file = os.path.join(ckpt.checkpoint_dir(root, 4), ckpt.rank_filename(0))
    with open(rank_file, "r+b") as f:
        f.truncate(1000)
    assert [p.split(" (")[0] for p in ckpt.verify_checkpoint(root, 4).problems] == [f"{rank_file} is unreadable"]


class Planted:
    """What an attacker would put in a checkpoint: unpickling it calls ``print`` (os.system in real life)."""

    def __reduce__(self):
        return print, ("planted code ran",)


def test_a_planted_pickle_is_a_one_line_error_and_never_runs(saved, tmp_path, capsys):
    # Where no checksum guards a file (written before checksums; Meta's shards) torch refused it with
    # a traceback whose message suggests loading it again with weights_only=False.
    root = copy_of(saved, tmp_path)
    drop_checksums(root, 4)
    rank_file = os.path.join(ckpt.checkpoint_dir(root, 4), ckpt.rank_filename(0))
    torch.save({"tensors": [], "rank_state": Planted()}, rank_file)
    err = load_error(root, capsys)
    assert err.startswith(f"megallama.pretrain: error: checkpoint of iteration 4 is damaged: {rank_file} is "
                          "unreadable (it holds objects other than tensors and plain data, which are never unpickled)")
    assert "planted code ran" not in capsys.readouterr().out
    from megallama.checkpoint import convert_checkpoint, open_checkpoint

    meta = str(tmp_path / "meta")
    convert_checkpoint(saved["root"], meta, "meta", progress=False)
    torch.save({"tok_embeddings.weight": Planted()}, os.path.join(meta, "consolidated.00.pth"))
    with pytest.raises(ValueError, match="consolidated.00.pth is unreadable \\(it holds objects other than"):
        open_checkpoint(meta)


def test_a_damaged_hf_folder_is_a_one_line_error_naming_the_file(saved, tmp_path):
    # Each was a traceback from safetensors or transformers (--finetune --load, the converters).
    from megallama.checkpoint import convert_checkpoint, open_checkpoint

    hf = str(tmp_path / "hf")
    convert_checkpoint(saved["root"], hf, "hf", progress=False)
    weights = os.path.join(hf, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)
    with pytest.raises(ValueError, match=f"^{re.escape(weights)} is unreadable \\(Error while deserializing header"):
        open_checkpoint(hf)
    with open(os.path.join(hf, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="config.json is unreadable"):
        open_checkpoint(hf)


def verify(capsys, *args) -> SimpleNamespace:
    """``python tools/verify_checkpoint.py ARGS`` in this process: its exit status and output."""
    capsys.readouterr()
    status = verify_checkpoint_tool.main(list(args))
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=status, stdout=out, stderr=err)


def test_verify_checkpoint_tool(saved, tmp_path, capsys):
    root = copy_of(saved, tmp_path)
    good = verify(capsys, root)
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == (f"checkpoint of iteration 4 ({ckpt.checkpoint_dir(root, 4)}) is complete: "
                                   "1 rank files, sizes and SHA-256 match")
    rank_file = os.path.join(ckpt.checkpoint_dir(root, 4), ckpt.rank_filename(0))
    flip_bytes(rank_file)
    bad = verify(capsys, root)
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        f"error: {rank_file} does not match its SHA-256 in metadata.json (corrupted)",
        f"checkpoint of iteration 4 ({ckpt.checkpoint_dir(root, 4)}) is damaged; the previous complete "
        "checkpoint is iteration 2 (--ckpt-step 2)"]
    assert verify(capsys, root, "--iteration", "2").returncode == 0
    missing = verify(capsys, str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "no checkpoint in" in missing.stderr
    # An iteration never saved is a mistyped number, not a damaged checkpoint (it said "metadata.json
    # is missing (an incomplete save)" and "damaged").
    never = verify(capsys, root, "--iteration", "3")
    assert never.returncode == 1
    assert never.stderr.splitlines() == [f"error: no checkpoint of iteration 3 in {root} "
                                         f"({ckpt.checkpoint_dir(root, 3)} does not exist; saved iterations: 2, 4)"]


def test_verify_checkpoint_shows_progress_on_a_terminal(saved, capsys, monkeypatch):
    # Hashing a large run's checkpoint takes minutes; the tool said nothing until the end.
    import sys

    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert verify_checkpoint_tool.main([saved["root"]]) == 0
    assert f"checking {ckpt.checkpoint_dir(saved['root'], 4)}: 100%" in capsys.readouterr().err


def test_temporaries_of_a_killed_save_are_removed_when_a_run_starts(saved, tmp_path, capsys):
    root = copy_of(saved, tmp_path)
    left = os.path.join(ckpt.checkpoint_dir(root, 4), ".rank_00000.pt.k1ll3d.tmp")
    with open(left, "wb") as f:
        f.write(b"half a rank file")
    assert verify(capsys, root).stdout.startswith(f"note: {left} is left from an interrupted save")
    assert main([*TINY, "--train-iters", "5", "--load", root, "--save", root]) == 0
    assert "removed 1 temporary files of interrupted saves" in capsys.readouterr().out
    assert not os.path.exists(left)


def test_converters_and_generation_read_through_the_same_checks(saved, tmp_path):
    from megallama.checkpoint.native import MegallamaReader

    root = copy_of(saved, tmp_path)
    reader = MegallamaReader(root)
    assert reader.load("norm.weight").shape == (32,)
    rank_file = os.path.join(ckpt.checkpoint_dir(root, 4), ckpt.rank_filename(0))
    flip_bytes(rank_file)
    with pytest.raises(ckpt.CheckpointError, match=r"iteration 4 is damaged: .*rank_00000\.pt does not match"):
        MegallamaReader(root).load("norm.weight")
