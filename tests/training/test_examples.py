"""The launch scripts in examples/ pass the entry point's checks at the scale they are written for."""
import os
import subprocess

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
