"""Issue 19, item 4: the rank that fails says why, whatever its local rank and whoever exits first:
one line on stderr naming the rank, and torchrun's error file (its failure summary shows it)."""
import os
import re
import subprocess
import sys

import pytest

from megallama.checkpoint.native import MegallamaReader, save_megallama
from megallama.pretrain import main
from megallama.checkpoint import storage as ckpt
from tests.training.test_pretrain_cli import TINY, free_port

pytestmark = pytest.mark.faults


def torchrun(*flags, nproc=2, entry=None):
    """``entry``: a shell command line run as each worker (``$0`` is python, ``$@`` the flags)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    if entry is None:
        command += ["-m", "megallama.pretrain", *flags]
    else:
        command += ["--no-python", "sh", "-c", entry, sys.executable, *flags]
    return subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=180)


def test_missing_rank_file_is_reported_by_the_rank_that_needs_it(tmp_path, capsys):
    serial = str(tmp_path / "serial")
    assert main([*TINY, "--train-iters", "2", "--save", serial]) == 0
    two_stages = str(tmp_path / "pp2")
    save_megallama(MegallamaReader(serial), two_stages, tp=1, pp=2, progress=False)
    missing = os.path.join(ckpt.checkpoint_dir(two_stages, 2), ckpt.rank_filename(1))
    os.remove(missing)
    result = torchrun(*TINY, "--train-iters", "4", "--pipeline-model-parallel-size", "2", "--load", two_stages)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("megallama.pretrain: error:")]
    assert errors == [f"megallama.pretrain: error: [rank 1] checkpoint of iteration 2 is damaged: {missing} is "
                      "missing (all ranks' files must be on one shared filesystem); no earlier complete checkpoint "
                      f"in {two_stages}"], result.stderr[-3000:]
    # torchrun's summary carries it too, from the rank's error file.
    assert re.search(r"error_file: \S+error\.json", result.stderr) and "CheckpointError: checkpoint of iteration 2" \
        in result.stderr, result.stderr[-3000:]


def test_config_error_on_a_non_zero_local_rank_is_shown(tmp_path):
    # Only local rank 1 gets a bad flag: rank 0 waits for it in the rendezvous and is then stopped.
    entry = 'if [ "$LOCAL_RANK" = 1 ]; then set -- "$@" --micro-batch-size 0; fi; exec "$0" -m megallama.pretrain "$@"'
    result = torchrun(*TINY, "--train-iters", "2", "--pipeline-model-parallel-size", "2", entry=entry)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("megallama.pretrain: error:")]
    assert errors == ["megallama.pretrain: error: [rank 1] --micro-batch-size must be at least 1, got 0"], \
        result.stderr[-3000:]
    assert "ConfigError: --micro-batch-size must be at least 1, got 0" in result.stderr
