"""The Ray executor on a real two-node cluster (conftest.py): every source's output, rejected
documents and report equal the local executor's; preprocessing gives byte-identical .bin/.idx; a
killed worker and a killed driver both end with the output of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from megallama.clean.runner import clean_corpus
from megallama.clean.sources import SOURCES
from tests.clean import inputs
from tests.clean.test_runner import make_commoncrawl_shards, read_output
from tests.executors.corpora import write_source_inputs

pytest.importorskip("ray")
from megallama.executors.ray_cluster import RayExecutor  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def clean_both(source, paths, tmp_path, address, **kw):
    local = clean_corpus(source, paths, str(tmp_path / "local"), str(tmp_path / "local.json"), workers=1,
                         keep_rejected=str(tmp_path / "local-rejected"), progress=False)
    with RayExecutor(address) as executor:
        assert executor.cpus == 2
        on_ray = clean_corpus(source, paths, str(tmp_path / "ray"), str(tmp_path / "ray.json"), executor=executor,
                              keep_rejected=str(tmp_path / "ray-rejected"), progress=False, **kw)
    return local, on_ray


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_on_ray_equals_one_local_worker(source, tmp_path, ray_cluster):
    paths = write_source_inputs(source, tmp_path / "in")
    local, on_ray = clean_both(source, paths, tmp_path, ray_cluster.address, dedup_partitions=3)
    assert on_ray == local and local["output_docs"] > 0
    assert (tmp_path / "ray.json").read_text() == (tmp_path / "local.json").read_text()
    assert read_output(tmp_path / "ray") == read_output(tmp_path / "local")
    assert read_output(tmp_path / "ray-rejected") == read_output(tmp_path / "local-rejected")


def test_preprocess_on_ray_is_byte_identical(tmp_path, ray_cluster):
    from megallama.data.preprocess import preprocess
    from megallama.executors import make_executor

    rng = random.Random(0)
    paths = []
    for i in range(3):  # NullTokenizer input: ids as text; a broken line and one without "text" are skipped
        paths.append(str(tmp_path / f"part-{i}.jsonl"))
        rows = [{"text": " ".join(str(rng.randrange(255)) for _ in range(rng.randint(1, 40)))} for _ in range(30)]
        inputs.write_jsonl(paths[-1], rows + [{"other": 1}], raw_lines={4: b"{broken"})
    local = preprocess(paths, str(tmp_path / "local"), "NullTokenizer", vocab_size=256, json_keys=["text"],
                       append_eod=True, progress=False)
    with make_executor("ray", ray_address=ray_cluster.address) as executor:
        on_ray = preprocess(paths, str(tmp_path / "ray"), "NullTokenizer", vocab_size=256, json_keys=["text"],
                            append_eod=True, progress=False, executor=executor)
    assert (on_ray.documents, on_ray.tokens, on_ray.skipped) == (local.documents, local.tokens, local.skipped)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ray_text_document{ext}").read_bytes() == (tmp_path / f"local_text_document{ext}").read_bytes()
    assert not [n for n in os.listdir(tmp_path) if "shards" in n]


def _kill_first_task_worker(cluster, names: tuple[str, ...], stop: threading.Event, killed: list) -> None:
    """SIGKILL the first worker process of `cluster` seen running a task named in `names`."""
    while not stop.is_set():
        for pid in cluster.processes():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read().split(b"\0")[0].decode("utf-8", "replace")
            except OSError:
                continue
            if title.startswith(tuple(f"ray::{n}" for n in names)):
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, title))
                return
        time.sleep(0.02)


def test_a_killed_ray_worker_is_redone_and_the_output_is_unchanged(tmp_path, ray_cluster):
    paths = make_commoncrawl_shards(tmp_path, n_shards=6, docs=300, seed=3)
    expected = clean_corpus("commoncrawl", paths, str(tmp_path / "ref"), str(tmp_path / "ref.json"), progress=False)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_task_worker, args=(ray_cluster, ("_pass1", "_pass2"), stop, killed))
    killer.start()
    try:
        with RayExecutor(ray_cluster.address) as executor:
            report = clean_corpus("commoncrawl", paths, str(tmp_path / "out"), str(tmp_path / "out.json"),
                                  executor=executor, progress=False)
    finally:
        stop.set()
        killer.join()
    assert killed, "no task was running to kill"
    assert report == expected
    assert read_output(tmp_path / "out") == read_output(tmp_path / "ref")


def test_a_killed_driver_resumes_from_the_completion_markers(tmp_path, ray_cluster):
    paths = make_commoncrawl_shards(tmp_path, n_shards=6, docs=300, seed=4)
    clean_corpus("commoncrawl", paths, str(tmp_path / "ref"), str(tmp_path / "ref.json"), progress=False)
    cmd = [sys.executable, os.path.join(REPO, "tools", "clean_corpus.py"), "--source", "commoncrawl", "--input", *paths,
           "--output", str(tmp_path / "out"), "--report", str(tmp_path / "out.json"), "--executor", "ray",
           "--ray-address", ray_cluster.address]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = tmp_path / "out" / ".clean" / "work"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and driver.poll() is None:
            if work.exists() and any(n.endswith(".pass1.json") for n in os.listdir(work)):
                break
            time.sleep(0.05)
        assert driver.poll() is None, "the run finished before it could be killed"
        driver.kill()
    finally:
        driver.kill()
        driver.wait()
    assert not (tmp_path / "out.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert (tmp_path / "out.json").read_text() == (tmp_path / "ref.json").read_text()
    assert read_output(tmp_path / "out") == read_output(tmp_path / "ref")


def test_a_task_error_reaches_the_driver_as_itself(tmp_path, ray_cluster):
    from megallama.data.jsonl import BadLineError
    from megallama.data.preprocess import preprocess

    inputs.write_jsonl(str(tmp_path / "a.jsonl"), [{"text": "1 2"}], raw_lines={0: b"{broken"})
    with RayExecutor(ray_cluster.address) as executor:
        with pytest.raises(BadLineError, match="a.jsonl:1") as caught:
            preprocess([str(tmp_path / "a.jsonl")], str(tmp_path / "p"), "NullTokenizer", vocab_size=8,
                       strict=True, progress=False, executor=executor)
    assert "\n" not in str(caught.value)
