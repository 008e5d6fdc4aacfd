"""Flags → PretrainConfig: Megatron names, the paper's defaults, one-line errors before any work."""
import pytest

from megallama.training.arguments import ConfigError, build_parser, parse_args
from megallama.training.config import PretrainConfig

TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--untie-embeddings-and-output-weights",
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
    assert c.optimizer.lr == 3e-4 and c.lr_schedule.min_lr == pytest.approx(3e-5)
    assert c.lr_schedule.lr_decay_style == "cosine" and c.lr_schedule.lr_decay_iters == 10
    assert c.model.norm_epsilon == 1e-6 and c.model.vocab_size == 32000
    c65 = parse_args(["--model-size", "65b", "--train-iters", "5000", "--mock-data"], env={})
    assert c65.optimizer.lr == 1.5e-4 and c65.lr_schedule.lr_warmup_iters == 2000
    assert c65.model.ffn_hidden_size == 22016 and c65.training.seq_length == 2048
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
    (["--data-path", "x"], 1, "give exactly one of --data-path, --mock-data, --sft-data-path and --train-data-path"),
    (["--hidden-dropout", "0.1"], 1, "LLaMA has no dropout"),
    # These were tracebacks from torch or numpy during set-up, or (--lr) an error about --min-lr.
    (["--lr", "-1"], 1, "--lr must be at least 0, got -1.0"),
    (["--weight-decay", "-0.1"], 1, "--weight-decay must be at least 0, got -0.1"),
    (["--adam-beta1", "1.5"], 1, "--adam-beta1 must be in [0, 1), got 1.5"),
    (["--adam-beta2", "nan"], 1, "--adam-beta2 must be in [0, 1), got nan"),
    (["--clip-grad", "-1"], 1, "--clip-grad must be at least 0 (0 = off), got -1.0"),
    (["--init-method-std", "-0.02"], 1, "--init-method-std must be at least 0, got -0.02"),
    (["--seed", "-1"], 1, "--seed must be at least 0, got -1"),
    (["--distributed-timeout-minutes", "0"], 1, "--distributed-timeout-minutes must be at least 1, got 0"),
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
    with pytest.raises(ConfigError, match="'a' should be the weight of"):
        parse_args([*base, "--data-path", "a", prefix, "0.5", prefix], env={})
    for ext in (".bin", ".idx"):
        (tmp_path / ("corpus_text_document" + ext)).write_bytes(b"")
    model = tmp_path / "tok.model"
    model.write_bytes(b"")
    monkeypatch.setattr("megallama.training.input_checks.sentencepiece_vocab_size", lambda path: 32003)
    with pytest.raises(ConfigError, match="has 32003 tokens, more than --vocab-size 32000"):
        parse_args([*base, "--data-path", prefix, "--tokenizer-model", str(model), "--vocab-size", "32000"], env={})
    c = parse_args([*base, "--data-path", prefix, "--tokenizer-model", str(model)], env={})
    assert c.model.vocab_size == 32003 and c.data.tokenizer_type == "SentencePieceTokenizer"


def test_a_mistyped_flag_is_one_line_naming_the_closest_flag(capsys):
    # argparse printed its ~100-line usage block (on every rank under torchrun) above the error.
    from megallama.pretrain import main

    assert main([*TINY, "--tensor-model-paralel-size", "2", "--save-intervl", "5"]) == 2
    assert capsys.readouterr().err == (
        "megallama.pretrain: error: unrecognized arguments: --tensor-model-paralel-size 2 --save-intervl 5 (did you "
        "mean --tensor-model-parallel-size, --save-interval?); --help lists the flags\n")
    with pytest.raises(ConfigError, match="^argument --train-iters: invalid int value: 'ten'; --help lists the flags$"):
        parse("--train-iters", "ten")


def test_tokenizer_and_data_path_mistakes_name_the_mistake(tmp_path):
    base = [f for f in TINY if f != "--mock-data"]
    prefix = str(tmp_path / "corpus_text_document")
    for ext in (".bin", ".idx"):
        (tmp_path / ("corpus_text_document" + ext)).write_bytes(b"")
    with pytest.raises(ConfigError, match=r"\.bin\.bin not found .*; give the prefix, without \.bin or \.idx$"):
        parse_args([*base, "--data-path", prefix + ".bin"], env={})
    # The SentencePiece .vocab file was a traceback; a tokenizer folder was "not found".
    vocab = tmp_path / "tok.vocab"
    vocab.write_text("<unk>\t0\n")
    with pytest.raises(ConfigError, match="tok.vocab is not a SentencePiece model .*could not parse"):
        parse_args([*base, "--data-path", prefix, "--tokenizer-model", str(vocab)], env={})
    with pytest.raises(ConfigError, match="is a folder: give a SentencePiece .model file, or --tokenizer-type "
                                          "HuggingFaceTokenizer"):
        parse_args([*base, "--data-path", prefix, "--tokenizer-model", str(tmp_path)], env={})


@pytest.mark.parametrize("split, message", [("a,b,c", "expected 1 to 3 numbers"), ("0,0,0", "sums to zero"),
                                            ("1..2", "--split '1..2': could not convert")])
def test_a_bad_split_is_an_error_before_any_work(split, message):
    # It was a traceback from the dataset builder, after the model was built.
    base = [f for f in TINY if f != "--mock-data"]
    with pytest.raises(ConfigError, match=message):
        parse_args([*base, "--data-path", "x", "--split", split], env={}, check_files=False)


# --- Megatron's flags with Megatron's meaning ---------------------------------------------------

BY_SAMPLES = [f for f in TINY if f not in ("--train-iters", "10", "--lr-warmup-iters", "2")]


def test_train_samples_counts_iterations_and_the_schedule_in_samples():
    c = parse_args([*BY_SAMPLES, "--global-batch-size", "8", "--train-samples", "100", "--lr-warmup-samples", "12",
                    "--lr-decay-samples", "90"], env={})
    assert c.training.train_iters == 12  # 100 // 8, as Megatron: the last partial batch is not trained
    s = c.lr_schedule
    assert (s.lr_warmup_iters, s.lr_warmup_samples, s.lr_decay_samples) == (0, 12, 90)
    assert s.warmup_and_decay_samples(8) == (12, 90)
    from megallama.training.lr_schedule import LRSchedule

    schedule = LRSchedule(s, c.optimizer.lr, c.training.global_batch_size)
    assert schedule.lr(1) == pytest.approx(c.optimizer.lr * 8 / 12)  # 8 of 12 warmup samples done
    assert schedule.lr(12) == s.min_lr  # 96 samples: past the 90-sample decay
    # Megatron's defaults by samples: no warmup (not LLaMA's 2000 iterations), decay over all samples.
    c = parse_args([*BY_SAMPLES, "--global-batch-size", "8", "--train-samples", "100"], env={})
    assert c.lr_schedule.warmup_and_decay_samples(8) == (0, 100)


@pytest.mark.parametrize("flags, message", [
    (["--train-iters", "10", "--train-samples", "80"], "give exactly one of --train-iters and --train-samples"),
    ([], "give exactly one of --train-iters and --train-samples"),
    (["--train-samples", "80", "--lr-decay-iters", "5"], "--train-samples counts the lr schedule in samples"),
    (["--train-samples", "80", "--lr-warmup-iters", "5"], "--train-samples counts the lr schedule in samples"),
    (["--train-iters", "10", "--lr-warmup-samples", "5"], "--lr-decay-samples and --lr-warmup-samples go with"),
    (["--train-samples", "4", "--global-batch-size", "8"], "--train-samples 4 is less than one --global-batch-size 8"),
    (["--train-iters", "10", "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "1"],
     "--lr-warmup-fraction replaces --lr-warmup-iters"),
    (["--train-samples", "80", "--lr-warmup-samples", "80"], "the lr warmup (80 samples"),
])
def test_training_length_flags_go_together_as_megatrons(flags, message):
    with pytest.raises(ConfigError) as info:
        parse_args([*BY_SAMPLES, *flags], env={})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_warmup_fraction_replaces_the_default_warmup():
    c = parse_args([*BY_SAMPLES, "--global-batch-size", "8", "--train-iters", "200", "--lr-decay-iters", "100",
                    "--lr-warmup-fraction", "0.05"], env={})
    s = c.lr_schedule
    assert s.lr_warmup_iters == 0 and s.warmup_and_decay_samples(8) == (pytest.approx(0.05 * 100 * 8), 800)
    # No warmup flag at all: LLaMA's 2000 iterations, megallama's own default.
    c = parse_args([*BY_SAMPLES, "--train-iters", "5000"], env={})
    assert c.lr_schedule.lr_warmup_iters == 2000 and c.lr_schedule.lr_warmup_fraction is None


def test_make_vocab_size_divisible_by_pads_as_megatron_and_only_when_given():
    assert parse("--vocab-size", "1000").model.vocab_size == 1000
    assert parse("--vocab-size", "1000", "--make-vocab-size-divisible-by", "128").model.vocab_size == 1024
    c = parse("--vocab-size", "1000", "--make-vocab-size-divisible-by", "128", "--tensor-model-parallel-size", "4",
              world_size=4)
    assert c.model.vocab_size == 1024  # a multiple of 128 × TP 4 = 512
    assert parse("--vocab-size", "1000", "--make-vocab-size-divisible-by", "3", "--tensor-model-parallel-size", "4",
                 world_size=4).model.vocab_size == 1008  # a multiple of 12


def test_padding_applies_to_the_tokenizers_vocabulary_too(tmp_path, monkeypatch):
    model = tmp_path / "tok.model"
    model.write_bytes(b"")
    monkeypatch.setattr("megallama.training.input_checks.sentencepiece_vocab_size", lambda path: 32003)
    c = parse("--tokenizer-model", str(model), "--make-vocab-size-divisible-by", "128")
    assert c.model.vocab_size == 32128


def test_embeddings_tied_for_explicit_shapes_as_megatron_untied_for_llama_presets():
    explicit = [f for f in TINY if f != "--untie-embeddings-and-output-weights"]
    assert parse_args(explicit, env={}).model.tie_word_embeddings is True
    assert parse().model.tie_word_embeddings is False
    preset = ["--train-iters", "10", "--lr-warmup-iters", "2", "--mock-data", "--model-size"]
    assert parse_args([*preset, "7b"], env={}).model.tie_word_embeddings is False
    assert parse_args([*preset, "llama2-7b", "--num-layers", "2"], env={}).model.tie_word_embeddings is False
    assert parse_args([*preset, "llama3.2-1b"], env={}).model.tie_word_embeddings is True
    assert parse_args([*preset, "llama3.2-1b", "--untie-embeddings-and-output-weights"],
                      env={}).model.tie_word_embeddings is False


def test_model_size_offers_every_preset():
    from megallama.config import _PRESETS

    action = next(a for a in build_parser()._actions if "--model-size" in a.option_strings)
    assert set(action.choices) == set(_PRESETS) >= {"llama2-70b", "llama3-8b", "llama3.2-3b"}


def test_grouped_query_attention_head_size_and_rope_scaling_flags():
    c = parse("--num-attention-heads", "8", "--group-query-attention", "--num-query-groups", "2", "--kv-channels", "8")
    assert (c.model.num_query_groups, c.model.kv_channels) == (2, 8)
    assert parse("--group-query-attention").model.num_query_groups == 1  # Megatron's default: multi-query
    assert parse("--num-query-groups", "2").model.num_query_groups == 4  # read only with --group-query-attention
    c = parse("--use-rope-scaling", "--rope-scaling-factor", "16")
    assert (c.model.rope_scaling.factor, c.model.rope_scaling.original_max_position_embeddings) == (16, 8192)
    assert parse().model.rope_scaling is None
    c = parse_args(["--model-size", "llama3-8b", "--num-layers", "2", "--train-iters", "10", "--lr-warmup-iters", "2",
                    "--mock-data"], env={})
    assert (c.model.num_query_groups, c.model.rope_theta, c.model.ffn_hidden_size) == (8, 500000.0, 14336)
    assert parse("--recompute-activations").model.recompute_granularity == "selective"


@pytest.mark.parametrize("flags, message", [
    (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--overlap-param-gather", "--use-distributed-optimizer", "--no-overlap-grad-reduce"],
     "--overlap-param-gather needs the gradient overlap"),
    (["--rotary-percent", "0.5"], "--rotary-percent 0.5: LLaMA applies rotary embeddings to the whole head"),
    (["--normalization", "LayerNorm"], "--normalization LayerNorm: LLaMA uses RMSNorm"),
    (["--fp16"], "--fp16: megallama trains in bf16"),
    (["--fp8-format", "hybrid"], "--fp8-format needs NVIDIA Transformer Engine"),
    (["--use-flash-attn", "--attention-backend", "unfused"], "--use-flash-attn asks for --attention-backend flash"),
    (["--valid-data-path", "x"], "give exactly one of --data-path"),
])
def test_megatron_flags_refused_in_one_line(flags, message):
    with pytest.raises(ConfigError) as info:
        parse(*flags)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_overlap_flags_reach_the_optimizer_config():
    o = parse().optimizer
    assert (o.overlap_grad_reduce, o.overlap_param_gather) == (True, False)
    assert parse("--no-overlap-grad-reduce").optimizer.overlap_grad_reduce is False
    o = parse("--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather").optimizer
    assert (o.use_distributed_optimizer, o.overlap_grad_reduce, o.overlap_param_gather) == (True, True, True)
    assert parse().optimizer.gradient_accumulation_fusion is True  # Megatron's default
    assert parse("--no-gradient-accumulation-fusion").optimizer.gradient_accumulation_fusion is False


def test_overlap_p2p_communication_parses_both_ways_on_by_default_as_megatron():
    flags = ("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
             "--global-batch-size", "2")
    assert parse(*flags, world_size=2).parallel.overlap_p2p_comm is True
    assert parse(*flags, "--overlap-p2p-communication", world_size=2).parallel.overlap_p2p_comm is True
    off = parse(*flags, "--no-overlap-p2p-communication", world_size=2)
    assert off.parallel.overlap_p2p_comm is False
    assert PretrainConfig.from_dict(off.to_dict()) == off


def test_accepted_megatron_flags_set_what_they_mean(capsys):
    c = parse("--manual-gc", "--manual-gc-interval", "5", "--num-workers", "2", "--use-flash-attn",
              "--use-mcore-models", "--rotary-percent", "1.0", "--cross-entropy-loss-fusion",
              "--calculate-per-token-loss", "--attention-softmax-in-fp32", "--no-masked-softmax-fusion",
              "--log-throughput", "--log-timers-to-tensorboard", "--log-memory-to-tensorboard",
              "--log-validation-ppl-to-tensorboard", "--apply-layernorm-1p", "--wandb-project", "")
    t, log = c.training, c.logging
    assert (t.manual_gc, t.manual_gc_interval, t.num_workers, t.attention_backend) == (True, 5, 2, "flash")
    assert log.log_throughput and log.log_timers_to_tensorboard and log.log_memory_to_tensorboard
    assert log.log_validation_ppl_to_tensorboard and log.wandb_project is None  # "" is off, as Megatron
    out = capsys.readouterr().out
    assert out.count("ignoring Megatron flag --apply-layernorm-1p: ") == 1 and out.count("\n") == 1


def test_separate_split_paths(tmp_path):
    base = [f for f in TINY if f != "--mock-data"]
    for name in ("train_text_document", "valid_text_document"):
        for ext in (".bin", ".idx"):
            (tmp_path / (name + ext)).write_bytes(b"")
    train, valid = str(tmp_path / "train_text_document"), str(tmp_path / "valid_text_document")
    c = parse_args([*base, "--train-data-path", train, "--valid-data-path", valid], env={})
    assert (c.data.train_data_path, c.data.valid_data_path, c.data.data_path) == ([train], [valid], [])
    with pytest.raises(ConfigError, match="data file .*missing_text_document.bin not found \\(from --valid-data-path"):
        parse_args([*base, "--train-data-path", train, "--valid-data-path", str(tmp_path / "missing_text_document")],
                   env={})
    with pytest.raises(ConfigError, match="give exactly one of --data-path"):
        parse_args([*base, "--train-data-path", train, "--data-path", valid], env={})


def test_wandb_project_without_wandb_names_the_extra(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"^--wandb-project needs Weights & Biases: pip install -e \.\[wandb\]$"):
        parse("--wandb-project", "p")
