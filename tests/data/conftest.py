"""Session fixtures: a varied multilingual corpus and a tiny LLaMA-style tokenizer trained on it."""
import numpy as np
import pytest

from tests.data.helpers import varied_text


@pytest.fixture(scope="session")
def corpus():
    return varied_text(np.random.default_rng(1234), 3000)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, corpus):
    from megallama.tokenizer import train_sentencepiece

    prefix = str(tmp_path_factory.mktemp("tok") / "tiny")
    lines = [line for doc in corpus for line in doc.split("\n") if line.strip()]
    return train_sentencepiece(lines, vocab_size=600, output_prefix=prefix, num_threads=2)

