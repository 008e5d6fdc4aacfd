"""The launch scripts in examples/ pass the entry point's checks at the scale they are written for, quote the
planner's figures for their layouts, and the data recipes pass only flags their tools have."""
import os
import subprocess
import sys

import pytest

from megallama.training.arguments import parse_args

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def launched_flags(tmp_path, script, env):
    """Run ``script`` with a stand-in ``torchrun`` that prints its arguments instead of launching."""
    fake = tmp_path / "torchrun"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", **env)
    out = subprocess.run(["bash", os.path.join(EXAMPLES, script)], env=env, capture_output=True, check=True).stdout
    args = out.decode().split("\0")[:-1]
    return args[:args.index("-m")], args[args.index("megallama.pretrain") + 1:]


@pytest.mark.parametrize("size, nodes, tp, pp, lr", [("7b", 8, 1, 1, 3e-4), ("13b", 16, 2, 1, 3e-4),
                                                     ("33b", 32, 2, 2, 1.5e-4), ("65b", 256, 4, 8, 1.5e-4)])
def test_paper_scripts(tmp_path, size, nodes, tp, pp, lr):
    launcher, flags = launched_flags(tmp_path, f"pretrain_llama_{size}.sh",
                                     {"NNODES": str(nodes), "NODE_RANK": "3", "MASTER_ADDR": "10.0.0.1",
                                      "MASTER_PORT": "6001", "GPUS_PER_NODE": "8"})
    assert launcher == ["--nnodes", str(nodes), "--node-rank", "3", "--nproc-per-node", "8",
                        "--master-addr", "10.0.0.1", "--master-port", "6001"]
    c = parse_args(flags, env={"WORLD_SIZE": str(nodes * 8)}, check_files=False)
    assert (c.parallel.tensor_model_parallel_size, c.parallel.pipeline_model_parallel_size) == (tp, pp)
    assert c.tokens_per_iteration == 4 * 1024 * 1024 and c.training.seq_length == 2048
    assert c.optimizer.lr == lr and c.lr_schedule.min_lr == pytest.approx(lr / 10)
    assert c.lr_schedule.lr_warmup_iters == 2000 and c.optimizer.adam_beta2 == 0.95
    tokens = c.training.train_iters * c.tokens_per_iteration
    assert tokens >= (1.0e12 if size in ("7b", "13b") else 1.4e12) > tokens - c.tokens_per_iteration
    weights = [float(w) for w in c.data.data_path[0::2]]
    assert weights == [67.0, 15.0, 4.5, 4.5, 4.5, 2.5, 2.0]


def test_cpu_script_is_tp2_pp2_on_four_processes(tmp_path):
    launcher, flags = launched_flags(tmp_path, "pretrain_llama_cpu.sh", {"OUT": str(tmp_path / "out")})
    assert "--nproc-per-node" in launcher and launcher[launcher.index("--nproc-per-node") + 1] == "4"
    c = parse_args(flags, env={"WORLD_SIZE": "4"})
    assert (c.parallel.tensor_model_parallel_size, c.parallel.pipeline_model_parallel_size) == (2, 2)
    assert c.data.mock_data and c.checkpoint.save == c.checkpoint.load == str(tmp_path / "out")


@pytest.mark.parametrize("script, preset, nodes, tp, seq, tokens", [
    ("pretrain_llama2_7b.sh", "llama2-7b", 8, 1, 4096, 2.0e12),
    ("pretrain_llama3_8b.sh", "llama3-8b", 8, 2, 8192, 15e12)])
def test_llama2_and_llama3_scripts(tmp_path, script, preset, nodes, tp, seq, tokens):
    from megallama.config import LlamaConfig

    _, flags = launched_flags(tmp_path, script, {"NNODES": str(nodes), "GPUS_PER_NODE": "8"})
    c = parse_args(flags, env={"WORLD_SIZE": str(nodes * 8)}, check_files=False)
    expected = LlamaConfig.preset(preset)
    for field in ("num_query_groups", "kv_channels", "ffn_hidden_size", "vocab_size", "norm_epsilon", "rope_theta",
                  "rope_scaling", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(c.model, field) == getattr(expected, field), field
    assert c.parallel.tensor_model_parallel_size == tp and c.training.seq_length == seq
    assert c.tokens_per_iteration == 4 * 1024 * 1024 and c.optimizer.lr == 3e-4
    assert tokens <= c.training.train_iters * c.tokens_per_iteration < tokens + c.tokens_per_iteration
    assert c.data.tokenizer_type == ("HuggingFaceTokenizer" if preset.startswith("llama3") else "SentencePieceTokenizer")


def test_finetune_llama3_from_hf_script(tmp_path):
    _, flags = launched_flags(tmp_path, "finetune_llama3_from_hf.sh",
                              {"HF_DIR": "/models/Meta-Llama-3-8B", "DATA_PREFIX": "/data/docs_text_document"})
    c = parse_args(flags, env={"WORLD_SIZE": "8"}, check_files=False)
    assert c.checkpoint.finetune and c.checkpoint.load == "/models/Meta-Llama-3-8B"
    assert (c.data.tokenizer_type, c.data.tokenizer_model) == ("HuggingFaceTokenizer", "/models/Meta-Llama-3-8B")
    assert (c.model.num_query_groups, c.model.rope_theta, c.model.tie_word_embeddings) == (8, 500000.0, False)
    assert c.training.seq_length == 8192 and c.parallel.tensor_model_parallel_size == 2


# -- the planner's figures in the pretrain scripts' comments ------------------------------------------------------
# Each script's header quotes a `python tools/plan.py …` command and, after "→", what it plans for the script's own
# layout: GB per GPU (tests/planning/test_plan_tool.py checks that one), its terms, tokens/s/GPU and days. All of
# them must be what the quoted command prints today.
PLANNED_SCRIPTS = [("pretrain_llama_7b.sh", 8), ("pretrain_llama_13b.sh", 16), ("pretrain_llama_33b.sh", 32),
                   ("pretrain_llama_65b.sh", 256), ("pretrain_llama2_7b.sh", 8), ("pretrain_llama3_8b.sh", 8)]
# a term of a quoted memory breakdown → the planner's fields it adds up
MEMORY_TERMS = {"weights": ("weights",), "grads": ("gradients",), "main": ("main_weights",),
                "Adam": ("optimizer_states",), "AdamW": ("main_weights", "optimizer_states"),
                "activations": ("activations",), "in flight": ("activations",), "buffers": ("working_buffers",)}


def header_text(script):
    """The script's leading comment as one line of text (continuations joined)."""
    with open(os.path.join(EXAMPLES, script)) as f:
        lines = [line[1:].strip() for line in f.read().splitlines()[1:] if line.startswith("#")]
    return " ".join(lines).replace("\\ ", " ")


def run_plan(argv, tmp_path, capsys):
    """`tools/plan.py ARGV --json` in this process."""
    from tests.data.helpers import load_tool

    capsys.readouterr()
    assert load_tool("plan").main([*argv, "--json"]) == 0
    import json
    return json.loads(capsys.readouterr().out)


def script_layout(tmp_path, script, nodes):
    from megallama.planning.report import pretrain_workload_and_layout

    _, flags = launched_flags(tmp_path, script, {"NNODES": str(nodes), "GPUS_PER_NODE": "8"})
    config = parse_args(flags, env={"WORLD_SIZE": str(nodes * 8)}, check_files=False)
    _, layout = pretrain_workload_and_layout(config)
    return {**layout.to_dict(), "recompute": "none"}  # selective recomputation is none in the planner


@pytest.mark.parametrize("script, nodes", PLANNED_SCRIPTS)
def test_quoted_planner_figures_are_the_planners(tmp_path, capsys, script, nodes):
    import re
    import shlex

    text = header_text(script)
    command = re.search(r"python tools/plan\.py (.*?) →", text)
    assert command, f"{script}: no `python tools/plan.py … →` in its header"
    plan = run_plan(shlex.split(command.group(1)), tmp_path, capsys)
    layout = script_layout(tmp_path, script, nodes)
    row = next((r for r in plan["fitting"] if r["layout"] == layout), None)
    assert row is not None, (script, layout, "not among the quoted command's fitting layouts")
    quoted = text.split("→", 1)[1]
    memory = row["memory_per_gpu"]
    assert float(re.search(r"(\d+\.\d) GB per GPU", quoted).group(1)) == round(memory["total"] / 1e9, 1)
    assert int(re.search(r"([\d,]+) tokens/s/GPU", quoted).group(1).replace(",", "")) == \
        round(row["tokens_per_s_per_gpu"]), row["description"]
    days = re.search(r"(\d+) days", quoted)
    if days:
        assert int(days.group(1)) == round(row["days"])
    for term, value in re.findall(r"(weights|grads|AdamW|Adam|main|activations|in flight|buffers)\s+(\d+\.\d)\b",
                                  quoted.split(";")[0]):
        expected = sum(memory[field] for field in MEMORY_TERMS[term]) / 1e9
        assert float(value) == round(expected, 1), (script, term, value, expected)


def test_secondary_planner_figures(tmp_path, capsys):
    """The other layouts the 65B and LLaMA-3-8B comments compare against."""
    import re
    import shlex

    text = header_text("pretrain_llama_65b.sh")
    argv = shlex.split(re.search(r"python tools/plan\.py (.*?) →", text).group(1))
    plan = run_plan([*argv, "--overlap-communication"], tmp_path, capsys)
    quoted = re.search(r"TP=8 PP=4, makes ([\d,]+) tokens/s/GPU at micro-batch 1; this layout (\d+)", text)
    assert plan["fitting"][0]["description"].startswith("TP=8 PP=4 ")
    assert int(quoted.group(1).replace(",", "")) == round(plan["fitting"][0]["tokens_per_s_per_gpu"])
    layout = script_layout(tmp_path, "pretrain_llama_65b.sh", 256)
    ours = next(r for r in plan["fitting"] if r["layout"] == layout)
    assert int(quoted.group(2)) == round(ours["tokens_per_s_per_gpu"])

    text = header_text("pretrain_llama3_8b.sh")
    argv = shlex.split(re.search(r"python tools/plan\.py (.*?) →", text).group(1))
    plan = run_plan(argv, tmp_path, capsys)
    quoted = re.search(r"TP=1 fits with pipeline stages, at best ([\d,]+), or at PP=1 only with full "
                       r"recomputation, ([\d,]+)\)", text)
    tp1 = [r for r in plan["fitting"] if r["layout"]["tp"] == 1]
    assert tp1[0]["layout"]["pp"] > 1
    assert int(quoted.group(1).replace(",", "")) == round(tp1[0]["tokens_per_s_per_gpu"])
    pp1 = [r for r in tp1 if r["layout"]["pp"] == 1]
    assert pp1 and all(r["layout"]["recompute"] == "full" for r in pp1)
    assert int(quoted.group(2).replace(",", "")) == round(pp1[0]["tokens_per_s_per_gpu"])


# -- the data recipes: every tool flag exists, the environment interface does what the headers say ---------------
def tool_help(tool, _cache={}):
    if tool not in _cache:
        root = os.path.dirname(EXAMPLES)
        _cache[tool] = subprocess.run([sys.executable, os.path.join(root, tool), "--help"], cwd=root,
                                      capture_output=True, text=True, timeout=120, check=True).stdout
    return _cache[tool]


def run_recipe(tmp_path, script, env, fakes=None):
    """Run a data recipe with stand-ins: `python` records each tool command (argv as JSON, one a line) instead of
    running it; ``fakes`` maps other command names to bash bodies. Returns the recorded commands."""
    import json

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "calls.jsonl"
    record = (f'"{sys.executable}" -c \'import json, sys; open(sys.argv[1], "a").write(json.dumps(sys.argv[2:]) + '
              f'"\\n")\' "{log}"')
    for name, body in {"python": f'{record} "$@"', **(fakes or {})}.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    given = env
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
    for name in ("RAY_ADDRESS", "EXECUTOR_FLAGS", "TOKENIZER", "SAMPLE_SHARDS"):  # only what the test sets
        if name not in given:
            env.pop(name, None)
    proc = subprocess.run(["bash", os.path.join(EXAMPLES, script)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def assert_flags_exist(calls):
    import re

    for argv in calls:
        if not argv or not argv[0].startswith("tools/"):
            continue
        for flag in (a for a in argv[1:] if a.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", tool_help(argv[0])), f"{flag} is not a flag of {argv[0]}"


def values(argv, flag):
    """The arguments after ``flag`` up to the next flag."""
    i = argv.index(flag) + 1
    j = next((k for k in range(i, len(argv)) if argv[k].startswith("--")), len(argv))
    return argv[i:j]


def unfiltered_shards(out, n):
    folder = out / "commoncrawl-unfiltered"
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"commoncrawl-{i:05d}.jsonl").write_text("")
    return sorted(str(p) for p in folder.glob("*.jsonl"))


def test_clean_recipe_flags_and_the_commoncrawl_sample(tmp_path):
    out = tmp_path / "cleaned"
    shards = unfiltered_shards(out, 250)  # one per WET file: far more than a sample at real scale
    calls = run_recipe(tmp_path, "clean_llama_corpus.sh", {"RAW": str(tmp_path / "raw"), "OUT": str(out),
                                                           "WORKERS": "3"})
    assert_flags_exist(calls)
    tools = [argv[0] for argv in calls]
    assert tools.count("tools/clean_corpus.py") == 3 + 6  # CommonCrawl twice, English Wikipedia, the six others
    sources = [values(a, "--source")[0] for a in calls if a[0] == "tools/clean_corpus.py"]
    assert set(sources) == {"commoncrawl", "wikipedia", "c4", "github", "books", "arxiv", "stackexchange"}
    ngram = next(a for a in calls if a[0] == "tools/train_ngram_lm.py")
    classifier = next(a for a in calls if a[0] == "tools/train_quality_classifier.py")
    sample = values(ngram, "--percentiles-from")
    assert sample == values(classifier, "--negative")
    assert len(sample) == 100 and len(set(sample)) == 100 and set(sample) <= set(shards)
    assert sample[0] == shards[0] and sample[-1] >= shards[-3]  # spread over the whole pass
    final = [a for a in calls if a[0] == "tools/clean_corpus.py" and "--perplexity-model" in a]
    assert len(final) == 1 and values(final[0], "--perplexity-model") == [str(out / "lm" / "en.bin")]
    assert all(values(a, "--workers") == ["3"] for a in calls if a[0] == "tools/clean_corpus.py")

    few = tmp_path / "few"
    shards = unfiltered_shards(few / "cleaned", 7)
    calls = run_recipe(few, "clean_llama_corpus.sh", {"RAW": str(tmp_path / "raw"), "OUT": str(few / "cleaned"),
                                                      "SAMPLE_SHARDS": "100"})
    assert values(next(a for a in calls if a[0] == "tools/train_ngram_lm.py"), "--percentiles-from") == shards


def test_preprocess_recipe_flags_blend_and_environment(tmp_path):
    clean, out = tmp_path / "clean", tmp_path / "tok"
    calls = run_recipe(tmp_path, "preprocess_llama_data.sh", {"CLEAN": str(clean), "OUT": str(out), "WORKERS": "5",
                                                              "VOCAB_SIZE": "1000", "TRAIN_TOKENS": "1e9"})
    assert_flags_exist(calls)
    tokenizer = next(a for a in calls if a[0] == "tools/train_tokenizer.py")
    assert values(tokenizer, "--vocab-size") == ["1000"]
    assert values(tokenizer, "--output-prefix") == [str(out / "llama_tokenizer")]
    preprocess = [a for a in calls if a[0] == "tools/preprocess_data.py"]
    assert len(preprocess) == 7 and all(values(a, "--workers") == ["5"] for a in preprocess)
    assert all(values(a, "--tokenizer-model") == [str(out / "llama_tokenizer.model")] for a in preprocess)
    report = next(a for a in calls if a[0] == "tools/mixture_report.py")
    assert values(report, "--train-tokens") == ["1e9"]
    assert [float(w) for w in values(report, "--data-path")[0::2]] == [67.0, 15.0, 4.5, 4.5, 4.5, 2.5, 2.0]

    calls = run_recipe(tmp_path / "meta", "preprocess_llama_data.sh", {"CLEAN": str(clean), "OUT": str(out),
                                                                       "TOKENIZER": "/models/tokenizer.model"})
    assert not any(a[0] == "tools/train_tokenizer.py" for a in calls)
    assert all(values(a, "--tokenizer-model") == ["/models/tokenizer.model"]
               for a in calls if a[0] == "tools/preprocess_data.py")


def test_ray_recipe_runs_every_data_tool_on_the_cluster(tmp_path):
    env = {"RAY_ADDRESS": "10.0.0.1:6379", "RAW": str(tmp_path / "raw"), "OUT": str(tmp_path / "cleaned"),
           "TOKENIZED": str(tmp_path / "tokenized")}
    unfiltered_shards(tmp_path / "cleaned", 3)
    calls = run_recipe(tmp_path, "clean_llama_corpus_ray.sh", env)
    assert_flags_exist(calls)
    sharded = [a for a in calls if a[0] in ("tools/clean_corpus.py", "tools/preprocess_data.py")]
    assert len(sharded) == 9 + 7
    assert all(values(a, "--executor") == ["ray"] and values(a, "--ray-address") == ["10.0.0.1:6379"]
               for a in sharded)
    assert all(values(a, "--output-prefix")[0].startswith(env["TOKENIZED"])
               and values(a, "--input")[0].startswith(env["OUT"]) for a in sharded if a[0] == "tools/preprocess_data.py")


def test_slurm_script_starts_ray_on_every_node_with_its_cpus(tmp_path):
    import json
    import shlex

    steps = tmp_path / "srun.jsonl"
    record = (f'"{sys.executable}" -c \'import json, sys; open(sys.argv[1], "a").write(json.dumps(sys.argv[2:]) + '
              f'"\\n")\' "{steps}" "$@"')
    fakes = {"scontrol": 'printf "node1\\nnode2\\nnode3\\n"',
             "srun": f'{record}\nfor a in "$@"; do [ "$a" = hostname ] && echo "10.0.0.5 fe80::1"; done; true',
             "sleep": "true"}
    env = {"SLURM_JOB_NODELIST": "node[1-3]", "SLURM_CPUS_PER_TASK": "64", "SLURM_SUBMIT_DIR": os.path.dirname(EXAMPLES),
           "RAW": str(tmp_path / "raw"), "OUT": str(tmp_path / "cleaned"), "TOKENIZED": str(tmp_path / "tokenized")}
    unfiltered_shards(tmp_path / "cleaned", 3)
    calls = run_recipe(tmp_path, "clean_llama_corpus_ray.sbatch", env, fakes)
    ray_steps = [a for a in map(json.loads, steps.read_text().splitlines()) if "ray" in a]
    assert sorted(a[a.index("-w") + 1] for a in ray_steps) == ["node1", "node2", "node3"]
    for argv in ray_steps:
        # a step gets the job's CPUs only when it asks again (Slurm >= 22.05 does not pass them down)
        assert "--cpus-per-task=64" in argv and "--num-cpus=64" in argv and "--block" in argv, shlex.join(argv)
        ray = argv[argv.index("ray"):]
        assert ("--head" in ray and "--port=6379" in ray) or "--address=10.0.0.5:6379" in ray
    assert sum("--head" in a for a in ray_steps) == 1
    assert all(values(a, "--ray-address") == ["10.0.0.5:6379"] for a in calls if a[0] == "tools/clean_corpus.py")
