"""The paper's quality classifier: a fastText linear model of "pages used as references in
Wikipedia" (positive) vs. random pages (negative); pages scoring under a threshold are dropped."""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable

from megallama.clean.langid import FastTextStage

POSITIVE = "__label__reference"
NEGATIVE = "__label__random"
_WS = re.compile(r"\s+")


def _fasttext_line(text: str) -> str:
    # fastText reads one example per line, space-tokenised
    return _WS.sub(" ", text).strip().lower()


def train_quality_classifier(positives: Iterable[str], negatives: Iterable[str], output: str, *,
                             epoch: int = 5, lr: float = 0.1, word_ngrams: int = 2, dim: int = 100,
                             bucket: int = 2_000_000, seed: int = 0) -> dict:
    """Train the classifier and save it atomically at `output`. Returns example counts."""
    if os.path.isdir(output):  # found now, not by the rename after reading and training
        raise ValueError(f"the model path {output} is a folder; name a file such as {os.path.join(output, 'quality.bin')}")
    examples = [f"{POSITIVE} {_fasttext_line(t)}" for t in positives if t.strip()]
    n_pos = len(examples)
    examples += [f"{NEGATIVE} {_fasttext_line(t)}" for t in negatives if t.strip()]
    n_neg = len(examples) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"need both classes to train: got {n_pos} positive and {n_neg} negative texts")
    random.Random(seed).shuffle(examples)
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        train_file = os.path.join(tmp, "train.txt")
        with open(train_file, "w", encoding="utf-8") as f:
            f.write("\n".join(examples) + "\n")
        tmp_model = os.path.join(tmp, "model.bin")
        options = dict(epoch=epoch, lr=lr, wordNgrams=word_ngrams, dim=dim, bucket=bucket, seed=seed)
        # fastText training diverges (NaN) in a process that has used another model (e.g. lid.176)
        # before: train in a fresh interpreter
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(_train, train_file, tmp_model, options).result()
        os.replace(tmp_model, output)
    return {"positive": n_pos, "negative": n_neg}


def _train(train_file: str, model_path: str, options: dict) -> None:
    import fasttext

    fasttext.train_supervised(input=train_file, thread=1, verbose=0, **options).save_model(model_path)


class QualityClassifier(FastTextStage):
    """`score(text)`: probability that `text` looks like a Wikipedia reference page."""

    def __init__(self, model_path: str, threshold: float = 0.5) -> None:
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"quality model not found: {model_path}")
        self.model_path = model_path
        self.threshold = threshold
        labels = self.model.get_labels()
        if set(labels) != {POSITIVE, NEGATIVE}:
            raise ValueError(f"{model_path} is not a quality model (labels {labels}, expected {POSITIVE} and "
                             f"{NEGATIVE}); train one with tools/train_quality_classifier.py")

    def score(self, text: str) -> float:
        labels, probs = self.model.predict(_fasttext_line(text), k=2)
        return min(1.0, float(dict(zip(labels, probs)).get(POSITIVE, 0.0)))

    def keep(self, text: str) -> tuple[bool, float]:
        s = self.score(text)
        return s >= self.threshold, s
