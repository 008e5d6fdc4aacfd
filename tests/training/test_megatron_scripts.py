"""Megatron-LM's example launch scripts: every flag they pass parses (honoured, ignored or refused).

The fixtures hold each script's argv, one flag per line (tests/fixtures/megatron_flags/); the
disposition of every flag is in DISPOSITION.md there. What is left of each script once the flags
megallama refuses are dropped parses into a full ``PretrainConfig`` with Megatron's meaning.
"""
import argparse
from pathlib import Path

import pytest

from megallama.training.arguments import ConfigError, build_parser, parse_args
from megallama.training.megatron_flags import (
    MEGATRON_FLAGS,
    check_megatron_compatibility_flags,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "megatron_flags"
SCRIPTS = sorted(p.stem for p in FIXTURES.glob("*.txt"))


def script_argv(name: str) -> list[str]:
    # Whitespace splitting, as bash splits the scripts' unquoted array expansions.
    lines = (FIXTURES / f"{name}.txt").read_text().splitlines()
    return [word for line in lines if line.strip() and not line.lstrip().startswith("#") for word in line.split()]


def script_flags(name: str) -> list[str]:
    return [word for word in script_argv(name) if word.startswith("--")]


def parse_script(name: str) -> tuple[argparse.Namespace, list[str]]:
    try:
        return build_parser().parse_known_args(script_argv(name))
    except ConfigError as error:  # an invalid choice, a bad number
        pytest.fail(f"{name}: a flag's value does not parse: {error}")


def without(argv: list[str], flags: set[str]) -> list[str]:
    """``argv`` less the given flags and their values."""
    out, skipping = [], False
    for word in argv:
        if word.startswith("--"):
            skipping = word in flags
        if not skipping:
            out.append(word)
    return out


# What megallama refuses in each script, first refusal first (the one parse_args reports).
REFUSED = {
    "train_llama3_8b_h100_fp8": ["--fp8-format", "--fp8-param-gather"],
    "train_gpt3_175b_distributed": ["--fp16", "--vocab-file", "--merge-file"],
}
# World sizes the scripts are launched with: the GPT-3 script's TP 8 × PP 16 needs a multiple of 128.
WORLD_SIZE = {"train_llama3_8b_h100_fp8": 8, "train_gpt3_175b_distributed": 1024}


def test_fixtures_exist():
    assert SCRIPTS == ["train_gpt3_175b_distributed", "train_llama3_8b_h100_fp8"]
    for name in SCRIPTS:
        assert script_flags(name)


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_flag_is_taken_as_an_abbreviation(name):
    # argparse would silently read a Megatron flag that is a prefix of a megallama one as that flag.
    parser = build_parser()
    assert parser.allow_abbrev is False
    defined = set(parser._option_string_actions)
    _, unknown = parse_script(name)
    abbreviated = [f for f in script_flags(name) if f not in defined and f not in unknown]
    assert abbreviated == []


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_of_the_script_parses(name):
    _, unknown = parse_script(name)
    assert unknown == []


@pytest.mark.parametrize("name", SCRIPTS)
def test_parse_args_stops_the_script_at_its_first_refused_flag(name):
    namespace, _ = parse_script(name)
    refused = [flag.name for flag in MEGATRON_FLAGS if flag.refusal(namespace) is not None]
    assert refused == REFUSED[name]
    with pytest.raises(ConfigError) as error:
        parse_args(script_argv(name), env={"WORLD_SIZE": str(WORLD_SIZE[name])}, check_files=False)
    assert "\n" not in str(error.value) and str(error.value).startswith(REFUSED[name][0])


def test_llama3_fp8_refusal_is_one_exact_line():
    with pytest.raises(ConfigError, match="^--fp8-format needs NVIDIA Transformer Engine, which megallama does "
                       "not use; use --bf16$"):
        parse_args(script_argv("train_llama3_8b_h100_fp8"), env={"WORLD_SIZE": "8"}, check_files=False)


def test_llama3_script_without_its_refused_flags_is_megatrons_llama3_8b(capsys):
    argv = without(script_argv("train_llama3_8b_h100_fp8"), set(REFUSED["train_llama3_8b_h100_fp8"]))
    c = parse_args(argv, env={"WORLD_SIZE": "8"}, check_files=False)
    m = c.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads) == (32, 4096, 14336, 32)
    assert (m.num_query_groups, m.kv_channels, m.rope_theta, m.vocab_size) == (8, 128, 1e6, 128256)
    assert m.tie_word_embeddings is False and m.rope_scaling is None and m.params_dtype.is_floating_point
    assert m.sequence_parallel is False  # TP 1: nothing to split the sequence over, as Megatron
    assert c.training.train_iters == 1953125000 // 128 and c.training.global_batch_size == 128
    s = c.lr_schedule
    assert (s.lr_warmup_samples, s.lr_decay_samples, s.lr_warmup_iters) == (3906252, 1949218748, 0)
    o = c.optimizer
    assert o.use_distributed_optimizer and o.overlap_grad_reduce and o.overlap_param_gather
    # The embedding and output layer's own lr and floor; the other groups' stay --lr and --min-lr.
    assert (o.decoupled_lr, o.decoupled_min_lr, o.lr, s.min_lr) == (5.0e-4, 4.5e-5, 1.5e-4, 1e-5)
    assert c.training.manual_gc and c.training.num_workers == 1 and c.training.attention_backend == "fused"
    assert c.training.profile and (c.training.profile_step_start, c.training.profile_step_end) == (4, 6)
    assert c.logging.log_throughput and c.data.mock_data
    ignored = capsys.readouterr().out
    for flag in ("--apply-layernorm-1p", "--grad-reduce-in-bf16", "--fp8-amax-history-len", "--tiktoken-pattern",
                 "--ckpt-format", "--context-parallel-size", "--empty-unused-memory-level"):
        assert f"ignoring Megatron flag {flag}: " in ignored
    assert ignored.count("--apply-layernorm-1p") == 1


def test_gpt3_script_without_its_refused_flags_follows_megatrons_defaults():
    argv = without(script_argv("train_gpt3_175b_distributed"), set(REFUSED["train_gpt3_175b_distributed"]))
    # Megatron's own checks refuse it too (DISPOSITION.md, note 2): a batch-size ramp-up with --train-iters.
    with pytest.raises(ConfigError, match=r"^--rampup-batch-size needs --train-samples instead of --train-iters "):
        parse_args(argv, env={"WORLD_SIZE": "1024"}, check_files=False)
    c = parse_args(without(argv, {"--rampup-batch-size"}), env={"WORLD_SIZE": "1024"}, check_files=False)
    # No --untie-embeddings-and-output-weights: tied, as Megatron, over its 16 pipeline stages (the
    # last stage holds a copy of the embedding).
    assert c.model.tie_word_embeddings is True
    assert (c.parallel.tensor_model_parallel_size, c.parallel.pipeline_model_parallel_size) == (8, 16)
    assert c.training.train_iters == 500000 and c.lr_schedule.lr_decay_iters == 430000
    # --lr-warmup-fraction .001 of 430000 iterations, counted in samples as Megatron: 430 iterations' worth.
    warmup, decay = c.lr_schedule.warmup_and_decay_samples(c.training.global_batch_size)
    assert warmup == pytest.approx(430 * 1536) and decay == 430000 * 1536 and c.lr_schedule.lr_warmup_iters == 0


@pytest.mark.parametrize("name", SCRIPTS)
def test_refused_flags_stop_the_run_in_one_line(name):
    namespace, _ = parse_script(name)
    refusals = [message for flag in MEGATRON_FLAGS if (message := flag.refusal(namespace)) is not None]
    print(f"{name}: refused: {refusals or 'none'}")
    if refusals:
        with pytest.raises(ValueError) as error:
            check_megatron_compatibility_flags(namespace)
        assert str(error.value) == refusals[0] and "\n" not in refusals[0]
        assert str(error.value).split()[0].rstrip(":") in script_flags(name)  # names the script's flag
    else:
        check_megatron_compatibility_flags(namespace)


def test_table_holds_only_flags_megallama_does_not_define():
    names = [flag.name for flag in MEGATRON_FLAGS]
    assert len(names) == len(set(names))
    # add_megatron_compatibility_flags skips a flag the parser defines already: then the table's
    # group would miss it, and the table entry would be dead.
    table_group = next(g for g in build_parser()._action_groups if g.title.startswith("Megatron-LM flags"))
    assert [a.option_strings[0] for a in table_group._group_actions] == names


def _disposition_rows(section: str) -> dict[str, str]:
    """{flag: proposal} of one table of DISPOSITION.md."""
    text = (FIXTURES / "DISPOSITION.md").read_text().split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| `--")]
    return {row[0].strip("| `"): row[-1] for row in rows}


def test_other_common_flags_are_as_disposition_md_says(capsys):
    rows = _disposition_rows("Other common flags (resumes, checkpoints, logging)")
    assert len(rows) == 11
    table = {flag.name: flag for flag in MEGATRON_FLAGS}
    defined = set(build_parser()._option_string_actions)
    for name, proposal in rows.items():
        assert name in defined
        if proposal.startswith("(a)"):  # megallama's own flag, not a table entry
            assert name not in table, name
        else:
            assert proposal.startswith("(b)") and table[name].ignored and not table[name].refused, name
    ignored = [name for name, proposal in rows.items() if proposal.startswith("(b)")]
    valued = {"--timing-log-level": "1", "--tensorboard-log-interval": "10"}
    argv = [word for name in ignored for word in (name, *([valued[name]] if name in valued else []))]
    parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--train-iters", "10",
                "--lr-warmup-iters", "2", "--mock-data", *argv], env={}, check_files=False)
    assert capsys.readouterr().out.splitlines() == [f"megallama.pretrain: ignoring Megatron flag {f.name}: {f.ignored}"
                                                    for f in MEGATRON_FLAGS if f.name in ignored]
