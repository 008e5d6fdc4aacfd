"""Inference: generation with a key/value cache, evaluation (checkpoints: ``megallama.checkpoint``)."""
from megallama.inference.generation import KVCache, SamplingParams, generate, prepare_for_inference, sample_next_token

__all__ = ["KVCache", "SamplingParams", "generate", "prepare_for_inference", "sample_next_token"]
