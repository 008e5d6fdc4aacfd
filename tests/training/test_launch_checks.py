"""Launching as a training team would: a bad configuration fails before any work with one line, and
nothing runs silently other than asked (a zero batch size, NCCL on a CPU machine, sequence parallelism
at TP 1, instruction examples cut by --seq-length, ranks launched with different flags)."""
import re

import numpy as np
import pytest
import torch

from megallama.data.indexed import IndexedDatasetWriter
from megallama.data.instructions import output_prefixes
from megallama.training.arguments import ConfigError, build_parser, parse_args
from tests.distributed_utils import run_distributed
from tests.faults.test_errors_from_any_rank import torchrun
from tests.training.test_arguments import parse

SHAPE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
         "--vocab-size", "64", "--untie-embeddings-and-output-weights", "--lr-warmup-iters", "0"]


@pytest.mark.parametrize("flags, message", [
    (["--global-batch-size", "0"], "--global-batch-size must be at least 1, got 0"),  # was: silently micro × DP
    (["--global-batch-size", "-2"], "--global-batch-size must be at least 1, got -2"),
    (["--micro-batch-size", "0", "--train-samples", "10"], "--micro-batch-size must be at least 1, got 0"),
])
def test_batch_sizes_below_one_are_refused(flags, message):
    with pytest.raises(ConfigError) as error:
        parse_args([*SHAPE, "--seq-length", "16", "--mock-data", *flags]
                   + ([] if "--train-samples" in flags else ["--train-iters", "2"]), env={})
    assert str(error.value) == message


def test_nccl_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^--distributed-backend nccl needs CUDA GPUs .* has no GPU: drop the "
                       "flag"):
        parse("--distributed-backend", "nccl")


def test_flags_that_change_nothing_say_so(capsys):
    assert not parse("--sequence-parallel").model.sequence_parallel
    assert "ignoring Megatron flag --sequence-parallel: it splits the sequence over the tensor-parallel ranks, " \
        "and --tensor-model-parallel-size is 1" in capsys.readouterr().out
    assert parse("--sequence-parallel", "--tensor-model-parallel-size", "2", world_size=2).model.sequence_parallel
    assert "--sequence-parallel" not in capsys.readouterr().out
    assert parse("--num-query-groups", "2").model.num_query_groups == 4
    assert "ignoring Megatron flag --num-query-groups 2: it is read only with --group-query-attention (as " \
        "Megatron); the model has 4 K/V heads" in capsys.readouterr().out
    assert parse("--num-query-groups", "2", "--group-query-attention").model.num_query_groups == 2
    assert "--num-query-groups" not in capsys.readouterr().out


def _instructions(prefix, conversations):
    """Write (ids, loss mask) pairs as preprocess_instructions does."""
    ids_prefix, mask_prefix = output_prefixes(prefix)
    with IndexedDatasetWriter(ids_prefix, np.int32) as ids, IndexedDatasetWriter(mask_prefix, np.uint8) as mask:
        for tokens, answer_from in conversations:
            ids.add_document(np.arange(len(tokens)) % 60 + 3)
            mask.add_document((np.arange(len(tokens)) >= answer_from).astype(np.uint8))
    return prefix


def test_instruction_examples_cut_by_seq_length_are_reported(tmp_path, capsys):
    # 17 tokens = 16 positions: fits; 30 tokens with the answer at 10: cut, keeps answer tokens;
    # 40 with the answer at 25: cut before its answer, trains nothing.
    prefix = _instructions(str(tmp_path / "sft"), [([0] * 17, 8), ([0] * 30, 10), ([0] * 40, 25), ([0] * 5, 2)])
    flags = [*SHAPE, "--sft-data-path", prefix, "--finetune", "--load", str(tmp_path), "--train-iters", "2",
             "--split", "100,0,0"]
    parse_args([*flags, "--seq-length", "16"], env={})
    assert capsys.readouterr().out == (f"megallama.pretrain: 2 of 4 examples in {prefix} are longer than "
                                       "--seq-length 16 and are cut to their first 16 positions; 1 of them keep no "
                                       "answer token and train nothing\n")
    parse_args([*flags, "--seq-length", "16"], env={"RANK": "1", "WORLD_SIZE": "1"})
    assert capsys.readouterr().out == ""  # once for the job
    parse_args([*flags, "--seq-length", "64"], env={})
    assert capsys.readouterr().out == ""
    idx = output_prefixes(prefix)[1] + ".idx"
    with open(idx, "r+b") as f:
        f.truncate(40)
    with pytest.raises(ConfigError, match=rf"^{idx} is truncated: 40 bytes, .* \(from --sft-data-path {prefix}\)$"):
        parse_args([*flags, "--seq-length", "16"], env={"RANK": "1", "WORLD_SIZE": "1"})


@pytest.mark.parametrize("both, rank1, shown", [
    # Data-parallel replicas that would silently train apart (the run exited 0, each rank its own lr).
    ([], "--lr 1e-2", "optimizer.lr 0.01, lr_schedule.min_lr 0.001"),
    # Stages whose exchanges would crash in gloo ("Connection reset by peer", no cause named).
    (["--pipeline-model-parallel-size", "2"], "--seq-length 32",
     "model.max_position_embeddings 32, training.seq_length 32"),
])
def test_ranks_launched_with_different_flags_all_say_so(both, rank1, shown):
    entry = f'if [ "$LOCAL_RANK" = 1 ]; then set -- "$@" {rank1}; fi; exec "$0" -m megallama.pretrain "$@"'
    result = torchrun(*SHAPE, *both, "--seq-length", "16", "--mock-data", "--train-iters", "2", "--global-batch-size",
                      "2", "--log-interval", "1", "--eval-iters", "0", entry=entry)
    assert result.returncode != 0 and "iteration        1/2" not in result.stdout
    # Both ranks fail at once and their lines may share one line of stderr.
    errors = sorted(re.findall(r"megallama\.pretrain: error: \[rank \d\] .*?same files", result.stderr))
    # Each rank says it; torchrun may stop the second before it has written its line.
    rank1 = (f"megallama.pretrain: error: [rank 1] the ranks were launched with different settings: {shown} on this "
             "rank differ on rank 0; give every rank the same flags and the same files")
    rank0 = "megallama.pretrain: error: [rank 0] the ranks were launched with different settings: "
    assert errors and all(e == rank1 or e.startswith(rank0) for e in errors), result.stderr[-3000:]


def test_help_shows_defaults_that_are_values_only():
    text = build_parser().format_help()
    # "--max-position-embeddings … default --seq-length. (default: None)" contradicted itself.
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    assert "(default: 2048)" in text and "(default: 1234)" in text and "(default: cosine)" in text


def _layout_of_rank(tp_of_rank1):
    from megallama.parallel import state

    tp = tp_of_rank1 if torch.distributed.get_rank() == 1 else 1
    try:
        state.initialize_model_parallel(tensor_model_parallel_size=tp)
    except state.LayoutMismatchError as error:
        return str(error)
    return None


def test_ranks_launched_with_different_layouts_all_say_so():
    # Before: each rank built the groups of its own layout and waited in new_group (over 5 minutes here).
    # pretrain's own check names the flag first (above); a library user calling
    # initialize_model_parallel gets this on every rank.
    layout = "the ranks were launched with different parallel layouts: tensor_model_parallel_size ({}), " \
        "pipeline_model_parallel_size (1), virtual stages per pipeline rank (1) on this rank, other sizes on " \
        "rank {}; give every rank the same flags"
    assert run_distributed(_layout_of_rank, 2, 2) == [layout.format(1, 1), layout.format(2, 0)]
    assert run_distributed(_layout_of_rank, 2, 1) == [None, None]
    entry = 'if [ "$LOCAL_RANK" = 1 ]; then set -- "$@" --tensor-model-parallel-size 2; fi; ' \
        'exec "$0" -m megallama.pretrain "$@"'
    result = torchrun(*SHAPE, "--seq-length", "16", "--mock-data", "--train-iters", "2", "--global-batch-size", "2",
                      "--eval-iters", "0", entry=entry)
    assert result.returncode != 0
    assert "different settings: parallel.tensor_model_parallel_size" in result.stderr, result.stderr[-3000:]
