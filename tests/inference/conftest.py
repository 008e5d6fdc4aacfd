"""Shared fixtures: a tiny random LLaMA (as an HF model and as ours) and a tiny SentencePiece model."""
import random

import pytest
import sentencepiece as spm
import torch

from megallama.config import LlamaConfig
from megallama.model import LlamaModel
from megallama.tokenizer import LLAMA_TRAINER_SETTINGS
from tests.data.helpers import load_tool  # noqa: F401  (tests import it from here)

WORDS = ("the cat sat on a mat with 123 dogs and 45 birds flying over green hills while old men "
         "watched quietly from their small houses near the river").split()


def tiny_config(**overrides) -> LlamaConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176, vocab_size=320,
                max_position_embeddings=96)
    return LlamaConfig(**{**base, **overrides})


def random_hf_model(config: LlamaConfig, seed: int = 0):
    """An HF LLaMA with random weights, norms randomised too (so that a swapped norm shows)."""
    import transformers  # not at module level: spawned test ranks import this file

    torch.manual_seed(seed)
    hf_config = config.to_hf()
    hf_config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.08)  # larger than the 0.02 default: logits far from uniform
    return model


def seeded_model(config: LlamaConfig, seed: int = 0) -> LlamaModel:
    """Our model drawn from ``seed`` (the same weights at any tensor-parallel size), scaled so that
    the logits are far from uniform, norms randomised."""
    torch.manual_seed(seed)
    model = LlamaModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.mul_(4.0)
    return model


def ours_from_hf(hf, config: LlamaConfig) -> LlamaModel:
    model = LlamaModel(config).eval()
    model.load_hf_state_dict(hf.state_dict())
    return model


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    """A 320-piece SentencePiece BPE model trained with LLaMA's settings on random sentences."""
    folder = tmp_path_factory.mktemp("tokenizer")
    rng = random.Random(0)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tok"), vocab_size=320,
                                   minloglevel=2, **LLAMA_TRAINER_SETTINGS)
    return str(folder / "tok.model")


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
