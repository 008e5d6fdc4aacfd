"""Pretraining: flags → config, the training loop, lr schedule, checkpoints, logging."""
