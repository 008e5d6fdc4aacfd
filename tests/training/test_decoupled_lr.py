"""Megatron's --decoupled-lr/--decoupled-min-lr: the input embedding and the output layer train with
their own peak lr and floor, over the same warmup and decay, as megatron-core's param groups
(``_get_param_groups``) and ``OptimizerParamScheduler.get_lr`` give them; everything else is --lr's."""
import types

import pytest
import torch
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import _get_param_groups
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megallama.parallel import state
from megallama.training import loop
from megallama.training.arguments import ConfigError, build_parser, parse_args
from megallama.training.config import PretrainConfig
from tests.distributed_utils import run_distributed

pytestmark = pytest.mark.usefixtures("one_thread")

LR, MIN_LR = 1e-2, 1e-3
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--seq-length", "16", "--vocab-size", "64", "--lr", str(LR), "--min-lr", str(MIN_LR),
        "--lr-warmup-iters", "2", "--lr-decay-iters", "5", "--mock-data", "--global-batch-size", "4",
        "--micro-batch-size", "2", "--eval-iters", "0", "--log-interval", "1"]
UNTIED = ["--untie-embeddings-and-output-weights"]
OWN = ("tok_embeddings.weight", "output.weight")


def trainer(*flags, iters=4, env=None):
    config = parse_args([*TINY, "--train-iters", str(iters), *flags], env={} if env is None else env,
                        check_files=env is None)
    return loop.Trainer(config, print_fn=lambda line: None)


def losses(*flags, iters=4) -> list:
    try:
        return trainer(*flags, iters=iters).train()
    finally:
        loop.shutdown()


def params(t) -> dict:
    t.optimizer.finish_param_sync()
    return {n: p.detach().clone() for n, p in t.chunks[0].module.named_parameters()}


def changed(before: dict, after: dict) -> dict:
    return {n: not torch.equal(before[n], after[n]) for n in before}


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("tie, decoupled, distributed", [
    (UNTIED, (), False),
    (UNTIED, ("--decoupled-lr", "5e-3"), False),  # floor: --min-lr, as megatron-core
    (UNTIED, ("--decoupled-lr", "5e-3", "--decoupled-min-lr", "2e-4"), True),
    ((), ("--decoupled-lr", "2e-2", "--decoupled-min-lr", "0"), False),  # tied: the head is the embedding
])
def test_each_parameter_gets_megatron_cores_lr_and_weight_decay(style, tie, decoupled, distributed):
    t = trainer(*tie, *decoupled, "--lr-decay-style", style,
                *(["--use-distributed-optimizer"] if distributed else []))
    try:
        model, o, s = t.chunks[0].module, t.config.optimizer, t.config.lr_schedule
        # Megatron's GPTModel marks its embedding and output layer weights so; megatron-core groups by it.
        model.tok_embeddings.weight.is_embedding_or_output_parameter = True
        model.output.weight.is_embedding_or_output_parameter = True
        groups = _get_param_groups([model], MegatronOptimizerConfig(
            lr=o.lr, min_lr=s.min_lr, decoupled_lr=o.decoupled_lr, decoupled_min_lr=o.decoupled_min_lr,
            weight_decay=o.weight_decay), None)
        warmup, decay = s.warmup_and_decay_samples(t.config.training.global_batch_size)
        reference = OptimizerParamScheduler(
            types.SimpleNamespace(param_groups=groups), init_lr=0.0, max_lr=o.lr, min_lr=s.min_lr,
            lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=style, start_wd=o.weight_decay,
            end_wd=o.weight_decay, wd_incr_steps=decay, wd_incr_style="constant")

        def group(tensor, of):
            return next(g for g in of if any(p is tensor for p in g["params"]))

        assert len(t.optimizer.param_groups) == (3 if decoupled else 2)
        for samples in range(0, decay + 9):
            reference.num_steps = samples
            t.schedule.apply(t.optimizer, samples)
            for e in t.optimizer.entries:
                ours, theirs = group(e.main, t.optimizer.param_groups), group(e.param, groups)
                assert ours["lr"] == reference.get_lr(theirs), (e.name, samples)
                assert ours["weight_decay"] == reference.get_wd(theirs) * theirs["wd_mult"], e.name
    finally:
        loop.shutdown()


@pytest.mark.parametrize("tie", [UNTIED, ()])
def test_a_decoupled_lr_equal_to_lr_trains_bit_identically(tie):
    reference = losses(*tie)
    assert losses(*tie, "--decoupled-lr", str(LR), "--decoupled-min-lr", str(MIN_LR)) == reference
    assert losses(*tie, "--decoupled-lr", str(LR)) == reference  # its floor is --min-lr
    assert losses(*tie, "--decoupled-lr", str(2 * LR)) != reference  # and the flag does act


@pytest.mark.parametrize("flags", [UNTIED, ["--use-distributed-optimizer"]])  # the latter tied
def test_decoupled_lr_zero_leaves_embedding_and_output_unchanged(flags):
    t = trainer(*flags, "--decoupled-lr", "0", "--decoupled-min-lr", "0")
    try:
        before = params(t)
        t.train()
        moved = changed(before, params(t))
    finally:
        loop.shutdown()
    assert "tok_embeddings.weight" in moved and ("output.weight" in moved) == (flags == UNTIED)  # tied: one
    assert moved == {n: n not in OWN for n in moved}


def _pipeline_run(flags):
    t = trainer(*flags, env={"WORLD_SIZE": "2"})
    try:
        before = params(t)
        t.train()
        stored_as = {n: getattr(p, "stored_as", None) for n, p in t.chunks[0].module.named_parameters()}
        return {"changed": changed(before, params(t)), "stored_as": stored_as}
    finally:
        state.destroy_model_parallel()  # the process group is the harness's


def test_a_last_stages_copy_of_a_tied_embedding_is_decoupled_too():
    first, last = run_distributed(_pipeline_run, 2, ["--pipeline-model-parallel-size", "2", "--decoupled-lr", "0",
                                                     "--decoupled-min-lr", "0"], timeout=300)
    assert first["changed"]["tok_embeddings.weight"] is False and last["stored_as"]["output.weight"] == \
        "tok_embeddings.weight"
    for stage in (first, last):
        assert stage["changed"] == {n: n not in OWN for n in stage["changed"]}


@pytest.mark.parametrize("saved, resumed", [
    (["--decoupled-lr", "3e-2", "--decoupled-min-lr", "0"], ["--decoupled-lr", "3e-2", "--decoupled-min-lr", "0"]),
    ([], ["--decoupled-lr", str(LR), "--decoupled-min-lr", str(MIN_LR)]),  # equal lrs: the plain run's losses
])
def test_resume_gives_the_uninterrupted_losses(tmp_path, saved, resumed):
    uninterrupted = losses(*UNTIED, *resumed)
    save = str(tmp_path / "ckpt")
    first = losses(*UNTIED, *saved, "--save", save, "--exit-interval", "2")
    rest = losses(*UNTIED, *resumed, "--load", save, "--save", save)
    assert len(first) == 2 and first + rest == uninterrupted


def test_stored_config_round_trips_and_old_configs_load_without_it():
    config = parse_args([*TINY, *UNTIED, "--train-iters", "4", "--decoupled-lr", "5e-3"], env={})
    stored = config.to_dict()
    assert PretrainConfig.from_dict(stored) == config and config.optimizer.decoupled_lr == 5e-3
    for field in ("decoupled_lr", "decoupled_min_lr"):
        del stored["optimizer"][field]  # a checkpoint's config from before the flags
    old = PretrainConfig.from_dict(stored).optimizer
    assert (old.decoupled_lr, old.decoupled_min_lr) == (None, None)


@pytest.mark.parametrize("flags, error", [
    (["--decoupled-lr=-1e-3"], "--decoupled-lr must be at least 0, got -0.001"),
    (["--decoupled-lr", "1e-3", "--decoupled-min-lr=-1"], "--decoupled-min-lr must be at least 0, got -1.0"),
    (["--decoupled-lr", "1e-3", "--decoupled-min-lr", "2e-3"],
     "--decoupled-min-lr 0.002 must not exceed --decoupled-lr 0.001"),
    (["--decoupled-lr", "1e-4"], "--decoupled-lr 0.0001 is below its floor --min-lr 0.001 (the floor without "
     "--decoupled-min-lr, as Megatron): give --decoupled-min-lr"),
])
def test_bad_values_stop_in_one_line(flags, error):
    with pytest.raises(ConfigError) as raised:
        parse_args([*TINY, "--train-iters", "4", *flags], env={})
    assert str(error) == str(raised.value)


def test_decoupled_min_lr_alone_is_accepted_and_does_nothing_as_in_megatron(capsys):
    config = parse_args([*TINY, *UNTIED, "--train-iters", "4", "--decoupled-min-lr", "0"], env={})
    assert config.optimizer.decoupled_min_lr == 0 and config.optimizer.decoupled_lr is None
    assert "ignoring Megatron flag --decoupled-min-lr: it is the floor of --decoupled-lr's param group, and there " \
        "is no --decoupled-lr" in capsys.readouterr().out
    assert losses(*UNTIED, "--decoupled-min-lr", "0") == losses(*UNTIED)


def test_help_describes_both_flags():
    text = build_parser().format_help()
    assert "--decoupled-lr DECOUPLED_LR" in text and "--decoupled-min-lr DECOUPLED_MIN_LR" in text
