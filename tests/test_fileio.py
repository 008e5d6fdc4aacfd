import os

import pytest

from megallama.fileio import atomic_open, atomic_path, remove_temporaries


@pytest.mark.parametrize("fsync", [False, True])
def test_atomic_open_replaces_only_on_success(tmp_path, fsync):
    target = tmp_path / "sub" / "out.txt"
    with atomic_open(str(target), "w", fsync=fsync) as f:
        f.write("first")
        assert not target.exists()  # nothing under the final name until the block ends
    assert target.read_text() == "first"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_open(str(target), "w", fsync=fsync) as f:
            f.write("half")
            raise RuntimeError("crash")
    assert target.read_text() == "first"
    assert os.listdir(target.parent) == ["out.txt"]  # no temporary left behind


def test_atomic_path_for_writers_that_take_a_path(tmp_path):
    target = tmp_path / "model.bin"
    with atomic_path(str(target)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "wb") as f:
            f.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


@pytest.mark.faults  # issue 19
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_mode_open_would_give(tmp_path, umask):
    before = os.umask(umask)
    try:
        with atomic_open(str(tmp_path / "shared.txt"), "w") as f:
            f.write("x")
        open(tmp_path / "plain.txt", "w").close()
    finally:
        os.umask(before)
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "shared.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


@pytest.mark.faults  # issue 19
def test_remove_temporaries_clears_what_a_killed_write_left(tmp_path):
    import signal
    import subprocess
    import sys

    # A writer killed with SIGKILL inside atomic_open: no cleanup code of its own runs.
    child = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from megallama.fileio import atomic_open\n"
        f"with atomic_open({str(tmp_path / 'rank_00000.pt')!r}, 'wb') as f:\n"
        "    f.write(b'half'); f.flush(); print('writing', flush=True); sys.stdin.read()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "writing\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    (tmp_path / "keep.txt").write_text("not a temporary")
    left = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".rank_00000.pt.")
    assert remove_temporaries(str(tmp_path), "rank_*.pt") == [str(tmp_path / left[0])]
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]
