"""Pretraining: flags → config, the training loop, lr schedule, logging (checkpoints: ``megallama.checkpoint``)."""
