"""bench/pretrain_gpu_peers.py at toy size on CPU: megallama trains and is measured (and profiled);
a peer that cannot run here (torchtitan and megatron-core want CUDA) is reported with the reason, not
dropped."""
import json
import math
import os
import subprocess
import sys

import pytest

from megallama.training.flops import estimate_flops
from tests.distributed_utils import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCH)
    try:
        import pretrain_gpu_peers
        yield pretrain_gpu_peers
    finally:
        sys.path.remove(BENCH)


def test_cpu_tiny_run_measures_megallama_and_says_why_a_peer_cannot_run(tmp_path, bench):
    out = tmp_path / "peers.json"
    wheels = tmp_path / "no_wheels"
    wheels.mkdir()
    subprocess.run([sys.executable, os.path.join(BENCH, "pretrain_gpu_peers.py"), "--device", "cpu", "--tiny",
                    "--rounds", "1", "--iters", "4", "--threads", "1", "--wheels", str(wheels), "--json", str(out),
                    "--profile-dir", str(tmp_path / "profiles")],
                   check=True, cwd=ROOT, timeout=600)
    details = json.loads(out.read_text())["details"]
    assert details["device"] == "CPU"
    assert details["peer_install"].startswith(f"no wheels in {wheels}")
    shape = details["shapes"]["tiny"]
    m, sides = shape["model"], shape["sides"]
    ours = sides["megallama"]
    assert ours["ran"] and ours["tokens_per_s"] > 0 and ours["peak_memory_gib"] > 0
    flops_per_token = estimate_flops(num_layers=m["num_layers"], hidden_size=m["hidden_size"],
                                     ffn_hidden_size=m["ffn_hidden_size"], seq_length=m["seq_length"],
                                     vocab_size=m["vocab_size"]) / m["seq_length"]
    assert ours["tflops"] == pytest.approx(ours["tokens_per_s"] * flops_per_token / 1e12)
    # The two iterations before the timed half, recorded by megallama's --use-pytorch-profiler.
    table = (tmp_path / "profiles" / "tiny.megallama" / "rank0.iter0-2.txt").read_text()
    assert table.startswith("rank 0, iterations [0, 2)") and "aten::mm" in table
    for peer in ("torchtitan", "megatron-core"):
        result = sides[peer]
        if result["ran"]:  # a peer release that trains on CPU: measured like ours
            assert result["tokens_per_s"] > 0 and result["loss"] > 0, (peer, result)
        else:  # the error and where it was raised, e.g. "... (raised at megatron/core/...:162)"
            assert "Error" in result["why"] and ("raised at" in result["why"] or "import" in result["why"]), result


def test_peer_install_reports_what_it_cannot_install(tmp_path, bench):
    assert bench.install_peers(str(tmp_path / "absent"), str(tmp_path / "target")).startswith("no wheels")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")  # installable tag, bad file
    (wheels / "other-1.0-cp27-cp27m-win32.whl").write_bytes(b"")  # another platform's build: skipped
    reason = bench.install_peers(str(wheels), str(tmp_path / "target"))
    assert reason.startswith("broken-1.0-py3-none-any.whl: ") and "other-1.0" not in reason


def test_7b_cut_keeps_the_blocks_that_fit(bench):
    gib = 2 ** 30
    # One 7B block is 202M parameters (32 of them + embeddings and head = LLaMA-7B's 6.7B).
    assert bench.BLOCK_PARAMS_7B == 202_375_168
    assert 32 * bench.BLOCK_PARAMS_7B + 2 * 32000 * 4096 == pytest.approx(6.74e9, rel=1e-3)
    # An 80 GB H100 holds 9 blocks at ~6.9 GB each (18 B a parameter + 3 GiB of activations).
    assert bench.layers_that_fit(80 * gib) == 9
    assert bench.layers_that_fit(141 * gib) == 17
    assert bench.layers_that_fit(4 * gib) == 1 and bench.layers_that_fit(10_000 * gib) == 32


def _megatron_core_step_on_cpu(profile_dir):
    """The benchmark's megatron-core side, its two hard-coded CUDA calls sent to the CPU."""
    import contextlib

    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.tensor_parallel.random as megatron_random
    import torch

    sys.path.insert(0, BENCH)
    import pretrain_gpu_peers

    torch.cuda.current_device = lambda: "cpu"  # RoPE moves its frequencies there
    fused_softmax.get_default_causal_mask = lambda sq: torch.triu(torch.ones(sq, sq), diagonal=1).bool()
    megatron_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    shape = pretrain_gpu_peers.TINY_SHAPES["tiny"]
    return pretrain_gpu_peers.megatron_core_side(shape, 2, torch.device("cpu"), profile_dir), shape["vocab_size"]


def test_megatron_core_side_trains_when_its_cuda_calls_are_redirected(tmp_path):
    """What the GPU run will execute for megatron-core, on CPU: it trains and starts at ln(vocab);
    its profile is the first of its two iterations."""
    pytest.importorskip("megatron.core")
    (result, vocab), = run_distributed(_megatron_core_step_on_cpu, 1, str(tmp_path), timeout=300)
    assert "aten::mm" in (tmp_path / "rank0.iter0-1.txt").read_text()
    assert result["layer_spec"] == "local" and result["tokens_per_s"] > 0 and result["peak_memory_bytes"] > 0
    assert result["loss"] == pytest.approx(math.log(vocab), rel=0.05)


def test_a_gpu_sessions_figures_are_stored_for_the_readme_table(tmp_path, monkeypatch):
    """`run_all.py --store-gpu DIR`: the session's JSON stored under bench/results with the device
    and the command a user would run (no session paths); a part the session skipped is left alone."""
    sys.path.insert(0, BENCH)
    try:
        import run_all
    finally:
        sys.path.remove(BENCH)
    session = tmp_path / "out"
    (session / "peers_16x2048").mkdir(parents=True)
    command = (f"python bench/pretrain_gpu_peers.py --rounds 1 --shapes 16x2048 --profile-dir /tmp/tmp.x "
               f"--json {session}/peers_16x2048/pretrain_gpu_peers.json")
    row = {"benchmark": "pretrain 16x2048, 1 GPU bf16", "metric": "tokens/s", "peer": "torchtitan", "ratio": 1.5,
           "target": "≥ 1.1×"}
    (session / "peers_16x2048" / "pretrain_gpu_peers.json").write_text(json.dumps(
        {"summary": [row], "details": {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "date": "2026-11-30",
                                       "command": command}}))
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(run_all, "RESULTS", str(results))
    run_all.store_gpu(str(session))
    assert sorted(p.name for p in results.iterdir()) == ["pretrain_gpu_peers.json"]
    stored = json.loads((results / "pretrain_gpu_peers.json").read_text())
    assert stored["machine"] == "NVIDIA H200, torch 2.11.0+cu130" and stored["date"] == "2026-11-30"
    assert stored["command"] == "python bench/pretrain_gpu_peers.py --rounds 1 --shapes 16x2048"
    assert stored["summary"] == [row]
    with pytest.raises(SystemExit, match="none of"):
        run_all.store_gpu(str(tmp_path / "empty"))
