import os

import pytest

from megallama.fileio import atomic_open, atomic_path


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
