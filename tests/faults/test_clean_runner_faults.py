"""clean_corpus under hostile resume state and a killed parent (issue 19): nothing in the resume
state is ever unpickled, and pool workers exit when their parent is killed."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megallama.clean import runner
from megallama.clean.runner import clean_corpus
from tests.clean.test_runner import make_commoncrawl_shards, read_output

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Payload:
    """Unpickling this writes `marker`: proof that a planted file was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crash_in_pass2(paths, out, monkeypatch):
    """A run that dies in its second pass, leaving its resume state in out/.clean/work."""
    real = runner._pass2
    monkeypatch.setattr(runner, "_pass2", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt("crash")))
    with pytest.raises(KeyboardInterrupt):
        clean_corpus("commoncrawl", paths, str(out), str(out) + ".json", progress=False)
    monkeypatch.setattr(runner, "_pass2", real)
    return out / ".clean" / "work"


@pytest.mark.faults
def test_planted_pickles_in_the_resume_state_are_never_executed(tmp_path, monkeypatch):
    paths = make_commoncrawl_shards(tmp_path, n_shards=3, seed=5)
    expected = clean_corpus("commoncrawl", paths, str(tmp_path / "ref"), str(tmp_path / "ref.json"), progress=False)
    marker = tmp_path / "executed"

    # a pickle where older versions kept pass-1 documents: ignored, the rerun gives the same output
    work = crash_in_pass2(paths, tmp_path / "out", monkeypatch)
    for shard in range(3):
        (work / f"commoncrawl-{shard:05d}.docs.pkl").write_bytes(pickle.dumps(Payload(str(marker))))
    assert clean_corpus("commoncrawl", paths, str(tmp_path / "out"), str(tmp_path / "out.json"), progress=False) == expected
    assert read_output(tmp_path / "out") == read_output(tmp_path / "ref")
    assert not marker.exists()

    # a crafted .npy holding a pickled object where the run keeps its hashes: a clear error naming
    # the file, nothing executed
    work = crash_in_pass2(paths, tmp_path / "out2", monkeypatch)
    crafted = work / "commoncrawl-00001.lines.npy"
    with open(crafted, "wb") as f:
        np.save(f, np.array([Payload(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="commoncrawl-00001.lines.npy"):
        clean_corpus("commoncrawl", paths, str(tmp_path / "out2"), str(tmp_path / "out2.json"), progress=False)
    assert not marker.exists()


def _running(pid: int) -> bool:
    """Alive and not a zombie (a reparented worker may wait for a reaper that never comes)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _children(pid: int) -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        found.add(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return found


@pytest.mark.faults
def test_pool_workers_exit_when_the_parent_is_killed(tmp_path):
    paths = make_commoncrawl_shards(tmp_path, n_shards=8, docs=800, seed=6)
    cmd = [sys.executable, os.path.join(REPO, "tools", "clean_corpus.py"), "--source", "commoncrawl", "--input", *paths,
           "--output", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"), "--workers", "2"]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        workers: set[int] = set()
        while time.time() < deadline and parent.poll() is None and len(workers) < 2:
            workers = _children(parent.pid)
            time.sleep(0.05)
        assert parent.poll() is None and len(workers) >= 2, "the pool never started"
        time.sleep(0.5)  # the workers are busy on shards now
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 5
        while time.time() < deadline and any(_running(w) for w in workers):
            time.sleep(0.1)
        alive = [w for w in workers if _running(w)]
    finally:
        parent.kill()
        parent.wait()
    for w in alive:  # end the strays this test made, then fail
        os.kill(w, signal.SIGKILL)
    assert not alive, f"pool workers {alive} still running 5 s after their parent was killed"
