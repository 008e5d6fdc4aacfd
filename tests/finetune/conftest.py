"""Fixtures: a tiny SentencePiece model and instruction sets in the three input formats."""
import json
import random

import pytest
import sentencepiece as spm

from megallama.tokenizer import LLAMA_TRAINER_SETTINGS

WORDS = ("what is the capital of france paris is a city on the river seine how many legs does a "
         "cat have four dogs too explain why the sky looks blue light scatters in air 123 45").split()


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("sft_tokenizer")
    rng = random.Random(0)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(sentence(rng, 8, 16) for _ in range(400)) + "\n[INST] [/INST] <<SYS>> <</SYS>>\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tok"), vocab_size=320,
                                   minloglevel=2, **LLAMA_TRAINER_SETTINGS)
    return str(folder / "tok.model")


def alpaca_records(n: int, seed: int = 0, long_every: int = 0) -> list[dict]:
    """Length-skewed records: mostly short answers, every ``long_every``-th a long one."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        long = long_every and i % long_every == 0
        out.append({"instruction": sentence(rng, 3, 8), "input": sentence(rng, 0, 4),
                    "output": sentence(rng, 30, 60) if long else sentence(rng, 2, 10)})
    return out


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, sp_model):
    """One tiny random LLaMA as an HF export (with the chat template) and as a megallama checkpoint
    saved for TP=2 (so loading it reshards)."""
    import torch
    import transformers

    from megallama.config import LlamaConfig
    from megallama.checkpoint import convert_checkpoint

    root = tmp_path_factory.mktemp("exported")
    config = LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176,
                         vocab_size=320, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config.to_hf())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.08) if "norm" not in name else p.uniform_(0.5, 1.5)
        # Byte-fallback pieces (ids 3-258) get zero logits, so greedy text is words (HF and
        # SentencePiece render invalid UTF-8 from random byte pieces differently).
        model.lm_head.weight[3:259] = 0.0
    model.save_pretrained(root / "random_hf")
    convert_checkpoint(str(root / "random_hf"), str(root / "megallama"), "megallama", tokenizer_model=sp_model,
                       target_tensor_parallel_size=2, progress=False)
    convert_checkpoint(str(root / "megallama"), str(root / "hf"), "hf", tokenizer_model=sp_model, progress=False)
    return {"hf": str(root / "hf"), "megallama": str(root / "megallama"), "root": root}
