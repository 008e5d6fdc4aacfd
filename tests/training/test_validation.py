"""Validation loss: per token over all the validation batches, as the training loss is per token
over the global batch (instruction data masks prompts, so batches count different numbers of tokens)."""
import pytest
import torch

from megallama.training import loop
from megallama.training.arguments import parse_args

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--untie-embeddings-and-output-weights", "--seq-length", "16", "--vocab-size", "64", "--lr", "1e-3",
        "--lr-warmup-iters", "1", "--mock-data", "--global-batch-size", "4", "--micro-batch-size", "2",
        "--train-iters", "2", "--eval-iters", "2"]


def test_validation_weighs_each_batch_by_its_loss_counted_tokens(monkeypatch):
    trainer = loop.Trainer(parse_args(TINY, env={}), print_fn=lambda line: None)
    try:
        # Two validation batches: 10 tokens with loss sum 10 (two micro-batches, Python int counts),
        # then 1 token with loss sum 2 (a device tensor count): the schedules give both kinds.
        results = iter([[{"loss_sum": torch.tensor(6.0), "num_tokens": 6},
                         {"loss_sum": torch.tensor(4.0), "num_tokens": 4}],
                        [{"loss_sum": torch.tensor(2.0), "num_tokens": torch.tensor(1)}]])
        seen = []

        def schedule(batches, forward_only):
            seen.append(forward_only)
            return next(results)

        monkeypatch.setattr(trainer, "_run_schedule", schedule)
        assert trainer.evaluate() == pytest.approx(12 / 11)  # the mean of the two batch means would be 1.5
        assert seen == [True, True]
        assert all(chunk.training for chunk in trainer.chunks)  # back in training mode
    finally:
        loop.shutdown()


def test_pretraining_validation_is_the_mean_of_equal_batches(monkeypatch):
    """With every token counted (pretraining) per-token and per-batch means agree: the real schedule's
    figure is the mean of the batches' own losses."""
    trainer = loop.Trainer(parse_args(TINY, env={}), print_fn=lambda line: None)
    try:
        per_batch = []
        run = trainer._run_schedule

        def schedule(batches, forward_only):
            losses = run(batches, forward_only)
            tokens = sum(item["num_tokens"] for item in losses)
            per_batch.append(float(sum(item["loss_sum"] for item in losses) / tokens))
            return losses

        monkeypatch.setattr(trainer, "_run_schedule", schedule)
        assert trainer.evaluate() == pytest.approx(sum(per_batch) / 2, rel=1e-6) and len(per_batch) == 2
    finally:
        loop.shutdown()
