"""Inference: generation with a key/value cache, checkpoint conversion (HF, Meta), evaluation."""
from megallama.inference.generation import (KVCache, SamplingParams, cached_forward, generate, prepare_for_inference,
                                            sample_next_token)

__all__ = ["KVCache", "SamplingParams", "cached_forward", "generate", "prepare_for_inference", "sample_next_token"]
