"""Flags → PretrainConfig: Megatron names, the paper's defaults, one-line errors before any work."""
import pytest

from megallama.training.arguments import ConfigError, build_parser, parse_args
from megallama.training.config import PretrainConfig

TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--train-iters", "10", "--lr-warmup-iters", "2", "--mock-data"]


def parse(*extra, world_size=1, check_files=True):
    return parse_args([*TINY, *extra], env={"WORLD_SIZE": str(world_size)}, check_files=check_files)


def test_every_flag_of_the_issue_exists_and_is_documented():
    issue_flags = """--tensor-model-parallel-size --pipeline-model-parallel-size
    --num-layers-per-virtual-pipeline-stage --sequence-parallel --use-distributed-optimizer --num-layers
    --hidden-size --ffn-hidden-size --num-attention-heads --seq-length --max-position-embeddings
    --norm-epsilon --micro-batch-size --global-batch-size --train-iters --lr --min-lr --lr-decay-style
    --lr-warmup-iters --lr-decay-iters --weight-decay --adam-beta1 --adam-beta2 --adam-eps --clip-grad
    --bf16 --seed --data-path --split --tokenizer-type --tokenizer-model --vocab-size --mock-data --save
    --load --save-interval --no-load-optim --no-load-rng --log-interval --eval-interval --eval-iters
    --tensorboard-dir --recompute-granularity --model-size""".split()
    actions = {opt: a for a in build_parser()._actions for opt in a.option_strings}
    for flag in issue_flags:
        assert flag in actions, flag
    for action in actions.values():
        assert action.help and len(action.help) > 15, action.option_strings


def test_paper_defaults_and_derived_values():
    c = parse_args(["--model-size", "7b", "--num-layers", "2", "--train-iters", "10", "--lr-warmup-iters", "2",
                    "--mock-data"], env={})
    assert (c.model.num_layers, c.model.hidden_size, c.model.ffn_hidden_size, c.model.num_attention_heads) == \
        (2, 4096, 11008, 32)
    assert (c.optimizer.adam_beta1, c.optimizer.adam_beta2, c.optimizer.weight_decay, c.optimizer.clip_grad) == \
        (0.9, 0.95, 0.1, 1.0)
    assert c.lr_schedule.lr == 3e-4 and c.lr_schedule.min_lr == pytest.approx(3e-5)
    assert c.lr_schedule.lr_decay_style == "cosine" and c.lr_schedule.lr_decay_iters == 10
    assert c.model.norm_epsilon == 1e-6 and c.model.vocab_size == 32000
    c65 = parse_args(["--model-size", "65b", "--train-iters", "5000", "--mock-data"], env={})
    assert c65.lr_schedule.lr == 1.5e-4 and c65.lr_schedule.lr_warmup_iters == 2000
    assert c65.model.ffn_hidden_size == 22016 and c65.model.seq_length == 2048
    # ffn from the released rule when no preset; DP and the global batch from the world size.
    c = parse("--tensor-model-parallel-size", "2", "--micro-batch-size", "3", world_size=8)
    assert c.model.ffn_hidden_size == 256 and c.parallel.data_parallel_size == 4
    assert c.training.global_batch_size == 12 and c.num_micro_batches == 1


def test_config_round_trips_through_a_plain_dict():
    c = parse("--sequence-parallel", "--tensor-model-parallel-size", "2", "--bf16", world_size=2)
    assert PretrainConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("flags, world, message", [
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 6,
     "world size 6 is not divisible by --tensor-model-parallel-size 2 × --pipeline-model-parallel-size 2 = 4"),
    (["--tensor-model-parallel-size", "8"], 8, "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 8"),
    (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "4"], 2,
     "--num-layers 4 is not divisible by --pipeline-model-parallel-size 2 × --num-layers-per-virtual-pipeline-stage 4 = 8"),
    (["--global-batch-size", "6", "--micro-batch-size", "2"], 2,
     "--global-batch-size 6 is not divisible by --micro-batch-size 2 × data-parallel size 2 = 4"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--global-batch-size", "3"], 2, "micro-batches per iteration (3"),
    (["--lr-warmup-iters", "10"], 1, "--lr-warmup-iters 10 must be below --lr-decay-iters 10"),
    (["--data-path", "x"], 1, "give exactly one of --data-path, --mock-data and --sft-data-path"),
    (["--hidden-dropout", "0.1"], 1, "LLaMA has no dropout"),
])
def test_bad_configs_are_one_line_errors(flags, world, message):
    with pytest.raises(ConfigError) as info:
        parse(*flags, world_size=world)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_data_and_oversized_tokenizer_vocabulary(tmp_path, monkeypatch):
    base = [f for f in TINY if f != "--mock-data"]
    prefix = str(tmp_path / "corpus_text_document")
    with pytest.raises(ConfigError, match=f"data file {prefix}.bin not found"):
        parse_args([*base, "--data-path", "0.5", prefix, "0.5", prefix], env={})
    with pytest.raises(ConfigError, match="weight 'a'"):
        parse_args([*base, "--data-path", "a", prefix, "0.5", prefix], env={})
    for ext in (".bin", ".idx"):
        (tmp_path / ("corpus_text_document" + ext)).write_bytes(b"")
    model = tmp_path / "tok.model"
    model.write_bytes(b"")
    monkeypatch.setattr("megallama.training.arguments.sentencepiece_vocab_size", lambda path: 32003)
    with pytest.raises(ConfigError, match="has 32003 tokens, more than --vocab-size 32000"):
        parse_args([*base, "--data-path", prefix, "--tokenizer-model", str(model), "--vocab-size", "32000"], env={})
    c = parse_args([*base, "--data-path", prefix, "--tokenizer-model", str(model)], env={})
    assert c.model.vocab_size == 32003 and c.data.tokenizer_type == "SentencePieceTokenizer"
