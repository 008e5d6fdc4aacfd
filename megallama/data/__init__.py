"""Data: Megatron-compatible indexed datasets, GPT sample windows, blending, tokenizers."""
