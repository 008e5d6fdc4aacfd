"""tools/plan.py end to end, the example scripts' layouts against the planner, and the estimate
``megallama.pretrain`` prints and stops on."""
import json
import os
import re
import subprocess
import sys

import pytest

from megallama.config import LlamaConfig
from megallama.planning.calibration import load_calibration
from megallama.planning.hardware import gpu_spec
from megallama.planning.planner import PlanRequest, plan
from megallama.planning.report import pretrain_memory_estimate, pretrain_workload_and_layout
from megallama.training.arguments import parse_args
from tests.data.helpers import load_tool
from tests.training.test_examples import launched_flags

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
plan_tool = load_tool("plan")


def test_65b_paper_budget(capsys):
    assert plan_tool.main(["--model-size", "65b", "--train-tokens", "1.4e12", "--gpus", "2048", "--gpu", "a100-80gb",
                           "--overlap-communication", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "layouts fit; the 3 fastest" in out and "#1 memory per GPU" in out
    assert "bench/results/pretrain_gpu_h100.txt" in out and "bench/results/pipeline.json" in out


def test_json_lists_every_fitting_layout_ranked(capsys):
    assert plan_tool.main(["--model-size", "7b", "--train-tokens", "1e12", "--gpus", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    speeds = [c["tokens_per_s_per_gpu"] for c in result["fitting"]]
    assert speeds == sorted(speeds, reverse=True) and len(speeds) > 10
    best = result["fitting"][0]
    assert best["memory_per_gpu"]["total"] <= 0.9 * 80e9
    assert {"weights", "gradients", "main_weights", "optimizer_states", "activations"} <= set(best["memory_per_gpu"])
    assert result["calibration"]["mfu"]["source"].startswith("bench/results/")


def test_shape_from_a_hugging_face_config(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(LlamaConfig.preset("13b").to_hf().to_json_string())
    assert plan_tool.main(["--hf-config", str(path), "--train-tokens", "1e12", "--gpus", "128", "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)["fitting"][0]
    assert plan_tool.main(["--model-size", "13b", "--train-tokens", "1e12", "--gpus", "128", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fitting"][0] == from_file


@pytest.mark.parametrize("override", [["--hidden-size", "2048"], ["--num-attention-heads", "64"]])
def test_a_preset_with_a_new_width_or_head_count_is_that_shape(override, capsys):
    """The preset's head size and K/V heads follow the new shape (a stale head size of 128 planned
    `--model-size 7b --hidden-size 2048` as a 2.3B model, and 64 heads as grouped-query attention)."""
    run = ["--train-tokens", "1e12", "--gpus", "8", "--json"]
    assert plan_tool.main(["--model-size", "7b", *override, *run]) == 0
    from_preset = json.loads(capsys.readouterr().out)["fitting"]
    assert plan_tool.main(["--num-layers", "32", "--hidden-size", "4096", "--num-attention-heads", "32", *override,
                           *run]) == 0
    assert json.loads(capsys.readouterr().out)["fitting"] == from_preset


@pytest.mark.parametrize("preset", ["llama2-7b", "llama3-8b", "llama3.2-1b"])
def test_a_llama2_or_3_preset_plans_as_its_hf_config(preset, tmp_path, capsys):
    """Pretraining's presets plan as the HF config of the same model: GQA, FFN width and LLaMA-3's
    128,256-token vocabulary included (the --vocab-size default of 32,000 applies without a preset).
    Positions are --seq-length's, as pretraining's default (they size the rotary tables)."""
    from megallama.config import LlamaConfig

    config = tmp_path / "config.json"
    LlamaConfig.preset(preset, max_position_embeddings=4096).to_hf().to_json_file(str(config))
    run = ["--train-tokens", "1e12", "--gpus", "64", "--seq-length", "4096", "--json"]
    assert plan_tool.main(["--model-size", preset, *run]) == 0
    from_preset = json.loads(capsys.readouterr().out)
    assert plan_tool.main(["--hf-config", str(config), *run]) == 0
    from_hf = json.loads(capsys.readouterr().out)
    assert from_preset["fitting"] == from_hf["fitting"] and from_preset["fitting"]


def test_nothing_fits_exits_one_with_the_reason(capsys):
    assert plan_tool.main(["--model-size", "65b", "--train-tokens", "1e12", "--gpus", "4"]) == 1
    assert "nothing fits a100-80gb" in capsys.readouterr().out


def test_gpu_figures_are_overridable(capsys):
    assert plan_tool.main(["--model-size", "65b", "--train-tokens", "1e12", "--gpus", "4",
                           "--gpu-memory-gb", "2000", "--top", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu"]["memory_gb"] == 2000


@pytest.mark.parametrize("argv, message", [
    (["--model-size", "7b", "--gpus", "8"], "needs --train-tokens and --gpus"),
    (["--gpu", "tpu-v9"], "invalid choice"),
    (["--train-tokens", "1e12", "--gpus", "8"], "give --model-size"),
    (["--model-size", "7b", "--train-tokens", "1e12", "--gpus", "8", "--gpu-memory-gb", "-1"], "must be positive"),
    # these divided by zero in the planner (a traceback) or planned negative days
    (["--model-size", "7b", "--train-tokens", "1e12", "--gpus", "8", "--global-batch-size", "0"],
     "--global-batch-size must be positive"),
    (["--model-size", "7b", "--train-tokens", "1e12", "--gpus", "8", "--micro-batch-size", "2", "0"],
     "--micro-batch-size must be positive"),
    (["--model-size", "7b", "--train-tokens", "-1", "--gpus", "8"], "--train-tokens must be positive"),
    (["--inference", "--inference-batch", "-1"], "--inference-batch must be positive"),
])
def test_bad_input_is_one_clear_line(argv, message):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plan.py"), *argv],
                            capture_output=True, text=True)
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]


def test_inference_table(capsys):
    assert plan_tool.main(["--inference", "--inference-batch", "8", "--json"]) == 0
    rows = {r["model_size"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == ["7b", "13b", "33b", "65b"]
    assert rows["65b"]["gflops_per_token"] > rows["7b"]["gflops_per_token"] * 8
    assert rows["7b"]["decode_tokens_per_s"] > rows["65b"]["decode_tokens_per_s"]
    assert rows["65b"]["gpus"] >= 2 and rows["7b"]["hellaswag"] == 76.1


# (script, nodes of 8 GPUs): each script's own node count; the scripts run micro-batch 1.
SCRIPTS = [("pretrain_llama_7b.sh", 8), ("pretrain_llama_13b.sh", 16), ("pretrain_llama_33b.sh", 32),
           ("pretrain_llama_65b.sh", 256), ("pretrain_llama2_7b.sh", 8), ("pretrain_llama3_8b.sh", 8)]


@pytest.mark.parametrize("script, nodes", SCRIPTS)
def test_example_script_layout_is_the_planners_choice(tmp_path, script, nodes):
    _, flags = launched_flags(tmp_path, script, {"NNODES": str(nodes), "GPUS_PER_NODE": "8"})
    config = parse_args(flags, env={"WORLD_SIZE": str(nodes * 8)}, check_files=False)
    workload, layout = pretrain_workload_and_layout(config)
    assert config.optimizer.overlap_param_gather  # the scripts hide the weight all-gathers, as planned
    request = PlanRequest(workload, gpu_spec("a100-80gb"), nodes * 8, 1e12, load_calibration(),
                          micro_batch_sizes=(config.training.micro_batch_size,),
                          overlap_param_gather=config.optimizer.overlap_param_gather)
    fitting = plan(request).fitting
    # selective recomputation is no recomputation here: compare what the trainer does
    ran = layout.__class__(**{**layout.to_dict(), "recompute": "none"})
    chosen = next((c for c in fitting if c.layout == ran), None)
    assert chosen is not None, (ran, "does not fit")
    # The script's layout is the planner's first choice, or ties with it: the bubble factors come
    # from a CPU benchmark, whose noise reorders layouts within a fraction of a percent.
    best = fitting[0].time.tokens_per_s_per_gpu
    assert chosen.time.tokens_per_s_per_gpu >= 0.995 * best, (ran, fitting[0].layout)
    # and the memory the script's comment quotes is the planner's today
    with open(os.path.join(ROOT, "examples", script)) as f:
        quoted = re.search(r"(\d+\.\d) GB per\s*(?:#\s*)?GPU", f.read())
    assert quoted and float(quoted.group(1)) == round(chosen.peak.total / 1e9, 1), (quoted, chosen.peak.total)


def test_pretrain_estimate_and_early_stop():
    config = parse_args(["--model-size", "7b", "--mock-data", "--train-iters", "1", "--bf16", "--lr-warmup-iters", "0",
                         "--global-batch-size", "8"], env={"WORLD_SIZE": "1"}, check_files=False)
    text, fits = pretrain_memory_estimate(config, device_bytes=None)
    assert fits and text.startswith("planned memory per GPU") and "Adam" in text
    text, fits = pretrain_memory_estimate(config, device_bytes=80e9)
    assert not fits and "needs" in text.splitlines()[-1] and "tools/plan.py" in text.splitlines()[-1]
