"""tools/generate.py: streamed output equals the library's continuation; under torchrun with TP=2
the same text comes out."""
import os
import socket
import subprocess
import sys

import pytest

from megallama.checkpoint import convert_checkpoint, load_model
from megallama.inference import SamplingParams, prepare_for_inference
from megallama.inference.text import generate_text, prompt_ids
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


def test_generate_cli_temperature_zero_is_greedy_and_a_long_generation_is_shortened(checkpoint, sp_model, capsys):
    cli = load_tool("generate")
    greedy = ["--load", checkpoint, "--prompt", PROMPTS[0], "--max-new-tokens", "12", "--greedy"]
    assert cli.main(greedy) == 0
    expected = capsys.readouterr().out
    # temperature 0 is greedy decoding, as in Meta's reference and vLLM (it was refused)
    assert cli.main([*greedy[:-1], "--temperature", "0", "--top-p", "0.5"]) == 0
    assert capsys.readouterr().out == expected
    # --greedy says the same as --temperature 0 (it was refused); another temperature still clashes
    assert cli.main([*greedy, "--temperature", "0"]) == 0
    assert capsys.readouterr().out == expected
    assert cli.main([*greedy, "--temperature", "0.5", "--top-k", "3"]) == 2
    assert capsys.readouterr().err == ("error: --greedy takes no --temperature/--top-k (only --temperature 0, "
                                       "greedy too)\n")
    # the default --max-new-tokens 128 exceeds the model's 96 positions: the generation is shortened
    # to fit, as Meta's reference does, with one notice (it was an error)
    model = prepare_for_inference(load_model(checkpoint)[0])
    tokenizer = SentencePieceTokenizer(sp_model)
    room = 96 - len(prompt_ids(tokenizer, PROMPTS[:1])[0])
    assert cli.main(["--load", checkpoint, "--prompt", PROMPTS[0], "--greedy"]) == 0
    out, err = capsys.readouterr()
    assert out == PROMPTS[0] + generate_text(model, tokenizer, PROMPTS[:1], room)[0] + "\n"
    notices = [line for line in err.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and f"generating {room} tokens, not --max-new-tokens 128" in notices[0]


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


def test_run_lm_eval_help_documents_the_megallama_model_args(monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    monkeypatch.setattr(sys, "argv", ["run_lm_eval.py", "run", "--help"])
    with pytest.raises(SystemExit) as exited:
        load_tool("run_lm_eval").main()
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "tokenizer_model" in out and "max_gen_toks" in out  # ours, then lm-eval's own flags
    assert "--num_fewshot" in out


def test_lm_eval_model_refuses_a_max_length_beyond_the_positions(checkpoint):
    pytest.importorskip("lm_eval")
    from megallama.inference.lm_eval_adapter import MegallamaLM

    assert MegallamaLM(load=checkpoint, max_length=96).max_length == 96
    with pytest.raises(ValueError, match="max_length=97 exceeds the model's max_position_embeddings"):
        MegallamaLM(load=checkpoint, max_length=97)
