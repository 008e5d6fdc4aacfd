"""Issue 19, items 1 and 2: SIGTERM to the torchrun launcher of a TP=2 × PP=2 run saves the current
iteration and resuming gives the losses of an uninterrupted run; kill -9 of one rank under
``torchrun --max-restarts 1`` resumes from the latest checkpoint by itself and the finished run's
loss curve is the uninterrupted one's. Megatron's --exit-interval and --exit-duration-in-mins."""
import os
import re
import signal
import subprocess
import sys

import pytest

from megallama.pretrain import main
from megallama.checkpoint import storage as ckpt
from tests.training.test_pretrain_cli import LOSS_LINE, TINY, assert_curve, free_port, losses_of

pytestmark = pytest.mark.faults


def run_serial(capsys, *flags) -> dict:
    assert main([*TINY, *flags]) == 0
    return losses_of(capsys.readouterr().out)


def test_exit_interval_and_duration_stop_saved(tmp_path, capsys):
    reference = run_serial(capsys, "--train-iters", "5")
    save = str(tmp_path / "interval")
    assert main([*TINY, "--train-iters", "20", "--save", save, "--exit-interval", "3"]) == 0
    out = capsys.readouterr().out
    assert sorted(losses_of(out)) == [1, 2, 3] and "--exit-interval 3: stopping after iteration 3" in out
    assert ckpt.read_tracker(save) == 3
    assert run_serial(capsys, "--train-iters", "5", "--load", save) == {i: reference[i] for i in (4, 5)}
    save = str(tmp_path / "duration")
    assert main([*TINY, "--train-iters", "20", "--save", save, "--exit-duration-in-mins", "1e-6"]) == 0
    assert "--exit-duration-in-mins 1e-06 reached: stopping after iteration 1" in capsys.readouterr().out
    assert ckpt.read_tracker(save) == 1


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (torchrun's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # the command name (2nd field) may hold spaces: fields after its ')' are fixed
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def launch(*flags, nproc: int, launcher=()):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *launcher,
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "megallama.pretrain", *flags]
    return subprocess.Popen(command, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_until_iteration(proc, iteration: int, lines: list) -> None:
    """Collect stdout lines until one logs ``iteration`` (or later)."""
    for line in proc.stdout:
        lines.append(line)
        match = LOSS_LINE.search(line)
        if match and int(match.group(1)) >= iteration:
            return
    raise AssertionError("the run ended before iteration %d:\n%s\n%s" % (iteration, "".join(lines),
                                                                          proc.stderr.read()[-3000:]))


def test_sigterm_to_torchrun_saves_the_current_iteration_and_resume_matches(tmp_path, capsys):
    save = str(tmp_path / "ckpt")
    proc = launch(*TINY, "--train-iters", "400", "--tensor-model-parallel-size", "2",
                  "--pipeline-model-parallel-size", "2", "--save", save, "--save-interval", "1000", nproc=4)
    lines = []
    try:
        read_until_iteration(proc, 3, lines)
        proc.send_signal(signal.SIGTERM)  # what Slurm / Kubernetes send before a preemption
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    out = "".join(lines) + out
    logged = losses_of(out)
    stopped = max(logged)
    assert stopped < 400
    assert re.search(rf"received SIGTERM: stopping after iteration {stopped}, saving a checkpoint", out), out[-2000:]
    assert ckpt.read_tracker(save) == stopped
    # The one traceback is the launcher's own (it re-raises the signal once its workers are done).
    assert "megallama.pretrain: error" not in err and err.count("Traceback") == 1 and "SignalException" in err, \
        err[-3000:]
    report = ckpt.verify_checkpoint(save)
    assert report.problems == [] and report.files_checked == 4  # every rank wrote its file
    reference = run_serial(capsys, "--train-iters", str(stopped + 2))
    assert_curve(logged, reference, range(1, stopped + 1))
    resumed = run_serial(capsys, "--train-iters", str(stopped + 2), "--load", save)
    assert_curve(resumed, reference, range(stopped + 1, stopped + 3))


def test_kill_of_one_rank_restarts_from_the_latest_checkpoint(tmp_path, capsys):
    save = str(tmp_path / "ckpt")
    iters = 16
    flags = [*TINY, "--train-iters", str(iters), "--pipeline-model-parallel-size", "2", "--save", save,
             "--load", save, "--save-interval", "3"]
    proc = launch(*flags, nproc=2, launcher=["--max-restarts=1"])
    lines = []
    try:
        read_until_iteration(proc, 5, lines)
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    out = "".join(lines) + out
    resumed_from = [int(i) for i in re.findall(r"loaded model weights of iteration (\d+)", out)]
    assert len(resumed_from) == 1 and resumed_from[0] >= 3, out[-3000:]
    curve = {}
    for i, v in LOSS_LINE.findall(out):  # a repeated iteration: the restarted run's value counts
        curve[int(i)] = float(v)
    reference = run_serial(capsys, "--train-iters", str(iters))
    assert_curve(curve, reference, range(1, iters + 1))
    assert ckpt.read_tracker(save) == iters


def test_sigusr1_mid_run_stops_after_that_iteration_saved(tmp_path, capsys, monkeypatch):
    from megallama.training.logger import TrainingLogger

    logged = TrainingLogger.training_iteration

    def signal_at_two(self, iteration, *args, **kwargs):
        logged(self, iteration, *args, **kwargs)
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # SIGUSR1's default action would end the process

    monkeypatch.setattr(TrainingLogger, "training_iteration", signal_at_two)
    save = str(tmp_path / "ckpt")
    assert main([*TINY, "--train-iters", "6", "--save", save]) == 0
    out = capsys.readouterr().out
    assert "received SIGUSR1: stopping after iteration 2, saving a checkpoint" in out
    assert ckpt.read_tracker(save) == 2
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers put back after the run


def test_signal_handler_is_on_with_save_unless_turned_off():
    from megallama.training.arguments import parse_args

    def handler(*flags):
        return parse_args([*TINY, "--train-iters", "2", *flags], env={}).training.exit_signal_handler

    assert handler("--save", "x") and not handler() and handler("--exit-signal-handler")
    assert not handler("--save", "x", "--no-exit-signal-handler")


def _one_rank_signalled():
    import torch
    import torch.distributed as dist

    from megallama.training.exits import ExitSettings, ExitWatch

    watch = ExitWatch(ExitSettings(signal_handler=True), torch.device("cpu"))
    before = watch.reason(1)
    if dist.get_rank() == 1:
        watch.received = signal.SIGTERM  # as the handler records it: only this rank was told
    return [before or "", watch.reason(2) or ""]


def test_ranks_agree_when_only_one_was_signalled():
    from tests.distributed_utils import run_distributed

    assert run_distributed(_one_rank_signalled, 2) == [["", "received SIGTERM"]] * 2
