"""The executor abstraction without a cluster: results in task order from any number of local
workers, and a one-line error naming the extra to install when Ray is missing."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from megallama.executors import LocalExecutor, make_executor, report_progress

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def square_and_pid(x: int) -> tuple[int, int]:
    report_progress(1)
    return x * x, os.getpid()


def test_local_executor_returns_results_in_task_order_from_several_processes():
    tasks = [(i,) for i in range(20)]
    with LocalExecutor(1) as serial:
        one = serial.run(square_and_pid, tasks)
    with make_executor("local", workers=2) as pool:
        two = pool.run(square_and_pid, tasks, desc="square", progress=True)
    assert [r for r, _ in one] == [r for r, _ in two] == [i * i for i in range(20)]
    assert {p for _, p in one} == {os.getpid()} and os.getpid() not in {p for _, p in two}
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor("dask")
    with pytest.raises(ValueError, match="at least 1"):
        LocalExecutor(0)


def fail_first_else_sleep(i: int, folder: str) -> None:
    if i == 0:
        raise ValueError("task 0 failed")
    time.sleep(0.2)
    open(os.path.join(folder, str(i)), "w").close()


def test_a_failed_task_does_not_wait_for_the_queued_ones(tmp_path):
    """The pool's exit ran every queued task before the error (or a Ctrl-C) came out: an hour of
    shards on a large corpus."""
    with LocalExecutor(2) as pool, pytest.raises(ValueError, match="task 0 failed"):
        pool.run(fail_first_else_sleep, [(i, str(tmp_path)) for i in range(40)])
    assert len(os.listdir(tmp_path)) < 10  # the tasks already handed to the workers, not all 39


@pytest.mark.parametrize("tool", ["clean_corpus.py", "preprocess_data.py"])
def test_executor_ray_without_ray_says_what_to_install(tool, tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "1 2"}\n')
    args = {"clean_corpus.py": ["--source", "c4", "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "o"),
                                "--report", str(tmp_path / "r.json")],
            "preprocess_data.py": ["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "p"),
                                   "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"]}[tool]
    hide_ray = ("import runpy, sys; sys.modules['ray'] = None; sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide_ray, os.path.join(REPO, "tools", tool), *args,
                             "--executor", "ray"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --executor ray needs Ray, an optional dependency: pip install -e .[cluster]"]
    stray = subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), *args, "--ray-address", "h:1"],
                           capture_output=True, text=True, timeout=120)
    assert stray.returncode == 1 and stray.stderr.strip() == "error: --ray-address needs --executor ray"


def test_an_unreachable_ray_address_is_a_one_line_error_at_once(tmp_path):
    """ray.init retried an address where nothing listens for minutes (20 tries of 30 s)."""
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    (tmp_path / "a.jsonl").write_text('{"text": "1 2"}\n')
    start = time.monotonic()
    result = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input",
                             str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "p"), "--tokenizer-type",
                             "NullTokenizer", "--vocab-size", "10", "--executor", "ray", "--ray-address", address],
                            capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 30
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: --ray-address {address}: no Ray cluster answers there (Connection refused); "
        "start one with `ray start --head` or fix the address"]
