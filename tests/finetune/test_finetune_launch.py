"""`megallama.pretrain --finetune --sft-data-path`: TP=2 × PP=2 (with SP) equals the serial run,
weights load from a megallama checkpoint or its HF export alike, and a relaunch resumes exactly."""
import io
from contextlib import redirect_stdout

import pytest
import torch

from megallama.data.instructions import preprocess_instructions
from megallama.checkpoint import convert_checkpoint
from megallama.pretrain import main
from megallama.training.arguments import ConfigError, parse_args
from tests.finetune.conftest import alpaca_records, write_jsonl
from tests.training.test_pretrain_cli import assert_curve, losses_of, torchrun

ITERS = 4
SHAPE = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
         "--untie-embeddings-and-output-weights",
         "--seq-length", "64", "--log-interval", "1", "--eval-iters", "0"]


def run(*flags) -> dict:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(list(flags)) == 0
    return losses_of(out.getvalue())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sp_model):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers (see tests/training/test_pretrain_cli.py)
    root = tmp_path_factory.mktemp("finetune")
    data = write_jsonl(root / "sft.jsonl", alpaca_records(120, long_every=8))
    preprocess_instructions([data], str(root / "sft"), "alpaca", sp_model, progress=False)
    base = str(root / "base")
    run(*SHAPE, "--mock-data", "--vocab-size", "320", "--train-iters", "2", "--global-batch-size", "2",
        "--lr-warmup-iters", "1", "--save", base, "--save-interval", "1")
    finetune = [*SHAPE, "--finetune", "--sft-data-path", str(root / "sft"), "--tokenizer-model", sp_model,
                "--global-batch-size", "4", "--micro-batch-size", "1", "--lr", "1e-3", "--lr-warmup-iters", "1",
                "--lr-decay-iters", str(ITERS)]
    serial = run(*finetune, "--load", base, "--train-iters", str(ITERS))
    yield {"root": root, "base": base, "flags": finetune, "serial": serial}
    torch.set_num_threads(before)


def test_finetune_from_hf_export_equals_from_megallama_checkpoint(setup):
    assert sorted(setup["serial"]) == list(range(1, ITERS + 1))
    hf = str(setup["root"] / "base_hf")
    convert_checkpoint(setup["base"], hf, "hf", progress=False)
    from_hf = run(*setup["flags"], "--load", hf, "--train-iters", str(ITERS))
    assert_curve(from_hf, setup["serial"], range(1, ITERS + 1), rtol=1e-5)


def test_finetune_relaunch_resumes_exactly(setup):
    save = str(setup["root"] / "ft_resume")
    first = run(*setup["flags"], "--load", setup["base"], "--train-iters", "2", "--save", save)
    assert first == {i: setup["serial"][i] for i in (1, 2)}
    # The same command with more iterations continues from the run's own checkpoint, not the base.
    rest = run(*setup["flags"], "--load", setup["base"], "--train-iters", str(ITERS), "--save", save)
    assert rest == {i: setup["serial"][i] for i in range(3, ITERS + 1)}  # bit for bit


def test_ckpt_step_picks_the_iteration_finetuning_starts_from(setup):
    # --ckpt-step was ignored under --finetune: the run started from the tracker's iteration 2.
    from megallama.checkpoint.storage import checkpoint_dir

    stepped = run(*setup["flags"], "--load", setup["base"], "--ckpt-step", "1", "--train-iters", "2")
    assert stepped == run(*setup["flags"], "--load", checkpoint_dir(setup["base"], 1), "--train-iters", "2")
    assert stepped[1] != setup["serial"][1]


def test_tensor_pipeline_sequence_parallel_finetune_equals_serial(setup):
    result = torchrun(*setup["flags"], "--load", setup["base"], "--train-iters", str(ITERS),
                      "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                      "--sequence-parallel")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_curve(losses_of(result.stdout), setup["serial"], range(1, ITERS + 1))


def test_finetune_flag_errors(setup, sp_model):
    one = ["--train-iters", "1", "--lr-warmup-iters", "0"]
    with pytest.raises(ConfigError, match="--finetune needs --load"):
        parse_args([*SHAPE, "--finetune", "--sft-data-path", "x", *one], env={})
    with pytest.raises(ConfigError, match="instruction data file .*nope_text_document.bin not found"):
        parse_args([*SHAPE, "--sft-data-path", str(setup["root"] / "nope"), *one,
                    "--tokenizer-model", sp_model], env={})
    # A mistyped --load or --ckpt-step failed only after the data and the model were built.
    flags = [*setup["flags"], *one]
    with pytest.raises(ConfigError, match=r"--finetune --load .*typo does not exist"):
        parse_args([*flags, "--load", str(setup["root"] / "typo")], env={})
    with pytest.raises(ConfigError, match=r"--ckpt-step 5: no checkpoint of iteration 5 .*saved iterations: 1, 2\)"):
        parse_args([*flags, "--load", setup["base"], "--ckpt-step", "5"], env={})
    with pytest.raises(ConfigError, match="go together"):
        parse_args([*SHAPE, "--mock-data", "--reset-position-ids", *one], env={})
    with pytest.raises(ConfigError, match="not on --mock-data"):
        parse_args([*SHAPE, "--mock-data", "--eod-mask-loss", *one], env={})
    wrong_shape = [f if f != "32" else "64" for f in setup["flags"]]
    assert main([*wrong_shape, "--load", setup["base"], "--train-iters", "1"]) == 1


def test_pretraining_with_document_resets_runs_and_changes_the_loss(setup, sp_model):
    """Megatron's --reset-position-ids --reset-attention-mask --eod-mask-loss on plain pretraining data
    (the instruction ids, whose conversations end with EOD)."""
    flags = [*SHAPE, "--data-path", str(setup["root"] / "sft_text_document"), "--tokenizer-model", sp_model,
             "--train-iters", "2", "--lr-warmup-iters", "1", "--global-batch-size", "2"]
    plain = run(*flags)
    reset = run(*flags, "--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss")
    assert sorted(reset) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in reset.values())
    assert reset[1] != plain[1]


def test_bf16_zero1_finetune_follows_the_fp32_curve(setup):
    """bf16 weights with fp32 main weights and ZeRO-1, as pretraining: the same run within bf16's
    rounding."""
    bf16 = run(*setup["flags"], "--load", setup["base"], "--train-iters", str(ITERS), "--bf16",
               "--use-distributed-optimizer")
    assert_curve(bf16, setup["serial"], range(1, ITERS + 1), rtol=2e-2)
