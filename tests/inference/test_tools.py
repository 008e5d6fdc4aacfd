"""tools/generate.py: streamed output equals the library's continuation; under torchrun with TP=2
the same text comes out."""
import os
import socket
import subprocess
import sys

import pytest

from megallama.checkpoint import convert_checkpoint, load_model
from megallama.inference import SamplingParams, prepare_for_inference
from megallama.inference.text import generate_text
from megallama.tokenizer import SentencePieceTokenizer
from tests.inference.conftest import load_tool, random_hf_model, tiny_config

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "generate.py")
PROMPTS = ["the old cat sat on", "birds flying over 45 green"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sp_model):
    source, folder = str(tmp_path_factory.mktemp("hf_raw")), str(tmp_path_factory.mktemp("hf_with_tokenizer"))
    random_hf_model(tiny_config()).save_pretrained(source)
    convert_checkpoint(source, folder, "hf", tokenizer_model=sp_model, progress=False)
    return folder


def test_generate_cli_prints_prompt_and_continuation(checkpoint, sp_model, capsys, tmp_path):
    model = prepare_for_inference(load_model(checkpoint)[0])  # as tools/generate.py does
    tokenizer = SentencePieceTokenizer(sp_model)
    greedy = generate_text(model, tokenizer, PROMPTS[:1], 12)[0]
    assert len(greedy) > 0
    cli = load_tool("generate")
    assert cli.main(["--load", checkpoint, "--prompt", PROMPTS[0], "--max-new-tokens", "12", "--greedy"]) == 0
    assert capsys.readouterr().out == PROMPTS[0] + greedy + "\n"

    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    sampled = generate_text(model, tokenizer, PROMPTS, 12, SamplingParams(greedy=False, top_k=20, temperature=0.9, seed=5))
    assert cli.main(["--load", checkpoint, "--tokenizer-model", sp_model, "--prompt-file", str(prompt_file),
                     "--max-new-tokens", "12", "--top-k", "20", "--temperature", "0.9", "--top-p", "1.0",
                     "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert out == "".join(f"{p}{c}\n{'-' * 40}\n" for p, c in zip(PROMPTS, sampled))
    assert cli.main(["--load", checkpoint, "--prompt", "x", "--greedy", "--top-k", "3"]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_under_torchrun_with_two_tensor_parallel_ranks(checkpoint, capsys):
    flags = ["--load", checkpoint, "--prompt", PROMPTS[1], "--max-new-tokens", "12", "--greedy"]
    assert load_tool("generate").main(flags) == 0
    serial = capsys.readouterr().out
    env = dict(os.environ, OMP_NUM_THREADS="1")
    parallel = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
         f"--master-port={_free_port()}", TOOL, *flags], env=env, capture_output=True, text=True, timeout=180)
    assert parallel.returncode == 0, parallel.stderr[-2000:]
    assert parallel.stdout == serial
    assert serial.startswith(PROMPTS[1]) and len(serial) > len(PROMPTS[1]) + 1
