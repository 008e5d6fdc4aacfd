"""Evaluation: perplexity over token sequences, and zero-shot multiple choice as in the paper (§3).

Perplexity: every sequence is cut into windows of ``seq_length`` inputs; each window predicts its
next ``seq_length`` tokens, so every token but a sequence's first is scored exactly once, with the
context of its window. Perplexity is exp(total negative log-likelihood / scored tokens).

Multiple choice: each choice is scored by the log-likelihood of its tokens given the context
(``[BOS] + context``); the choice follows the context after a space, and its tokens are those of
``context + " " + choice`` past the context's own, as lm-evaluation-harness cuts them (a byte-level
BPE such as LLaMA-3's tokenizes "mat" alone without that space; SentencePiece gives the same tokens
either way). The paper picks the completion with the highest likelihood, normalised by its length for
some datasets; both are reported: the plain sum, per character (as lm-evaluation-harness's
``acc_norm``) and per token.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

IGNORE = -100


def _token_log_likelihoods(model, batch: list[tuple[list[int], list[int]]], pad_id: int) -> list[torch.Tensor]:
    """For each (inputs, targets) pair of equal length, log p(target_t | inputs_≤t), float32."""
    width = max(len(x) for x, _ in batch)
    device = next(model.parameters()).device
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long, device=device)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long, device=device)
    for row, (x, y) in enumerate(batch):
        ids[row, :len(x)] = torch.as_tensor(x)  # right padding: causal attention never sees it
        labels[row, :len(y)] = torch.as_tensor(y)
    with torch.no_grad():
        logits = model(ids).float()
    nll = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=IGNORE,
                          reduction="none").view(labels.shape)
    return [-nll[row, :len(y)].cpu() for row, (_, y) in enumerate(batch)]


def perplexity(model, sequences: Iterable[Sequence[int]], seq_length: int, batch_size: int = 8,
               pad_id: int = 0, progress: bool = False) -> dict:
    """``{"tokens", "sequences", "nll", "perplexity"}`` of the model over ``sequences`` (token ids);
    sequences shorter than two tokens score nothing and are counted as ``too_short``."""
    if seq_length < 1 or seq_length > model.config.max_position_embeddings:
        raise ValueError(f"seq_length must lie in [1, {model.config.max_position_embeddings}], got {seq_length}")
    from tqdm import tqdm

    total_nll, tokens, count, too_short = 0.0, 0, 0, 0
    pending: list[tuple[list[int], list[int]]] = []

    def flush():
        nonlocal total_nll
        for ll in _token_log_likelihoods(model, pending, pad_id):
            total_nll -= float(ll.double().sum())
        pending.clear()

    vocab = model.config.vocab_size
    with tqdm(desc="perplexity", unit="seq", disable=not progress) as bar:  # closed before an error shows
        for seq in sequences:
            seq = [int(t) for t in seq]
            if seq and not 0 <= min(seq) <= max(seq) < vocab:  # else an IndexError deep in the embedding
                raise ValueError(f"sequence {count} holds token ids outside the model's vocabulary of {vocab} "
                                 f"(from {min(seq)} to {max(seq)}): was it tokenized with another tokenizer?")
            count += 1
            bar.update()
            if len(seq) < 2:
                too_short += 1
                continue
            for start in range(0, len(seq) - 1, seq_length):
                window = seq[start:start + seq_length + 1]
                pending.append((window[:-1], window[1:]))
                tokens += len(window) - 1
                if len(pending) == batch_size:
                    flush()
        if pending:
            flush()
    if tokens == 0:
        raise ValueError(f"no token to score: {count} sequences, {too_short} shorter than two tokens")
    return {"sequences": count, "too_short": too_short, "tokens": tokens, "nll": total_nll / tokens,
            "perplexity": math.exp(total_nll / tokens)}


def read_multiple_choice(path: str) -> tuple[list[dict], Counter]:
    """Examples ``{"context": str, "choices": [str, ...], "answer": index}`` of a JSONL file (the
    answer may also be given as the text of one of the choices); unusable lines are counted by reason."""
    examples, skipped = [], Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped["invalid JSON"] += 1
                continue
            if not isinstance(record, dict):
                skipped["not a JSON object"] += 1
                continue
            context, choices, answer = record.get("context"), record.get("choices"), record.get("answer")
            if not isinstance(context, str):
                skipped["context missing or not a string"] += 1
            elif not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                skipped["choices not a list of at least two non-empty strings"] += 1
            elif isinstance(answer, str) and answer in choices:
                examples.append({"context": context, "choices": choices, "answer": choices.index(answer)})
            elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
                examples.append({"context": context, "choices": choices, "answer": answer})
            else:
                skipped["answer not an index or text of a choice"] += 1
    return examples, skipped


def score_choices(model, tokenizer, context: str, choices: Sequence[str], batch_size: int = 8) -> list[dict]:
    """``{"loglikelihood", "tokens", "chars"}`` of each choice as a continuation of ``context``.

    The context is cut from the left when context plus choice exceed the model's positions."""
    # Spaces ending the context start the choice instead (lm-eval's rule): a word-initial space
    # belongs to the word's token.
    stripped = context.rstrip()
    separator = context[len(stripped):] or (" " if stripped else "")
    context_tokens = tokenizer.encode(stripped)
    context_ids = [tokenizer.bos_id] + context_tokens
    limit = model.config.max_position_embeddings + 1
    pairs = []
    for choice in choices:
        continuation = tokenizer.encode(stripped + separator + choice)[len(context_tokens):]
        if not continuation or len(continuation) >= limit:
            raise ValueError(f"choice {choice!r} has {len(continuation)} tokens; it needs 1 to {limit - 1}")
        full = (context_ids + continuation)[-limit:]
        inputs, targets = full[:-1], full[1:]
        masked = [IGNORE] * (len(targets) - len(continuation)) + targets[-len(continuation):]
        pairs.append((inputs, masked, len(continuation)))
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        lls = _token_log_likelihoods(model, [(x, y) for x, y, _ in chunk], tokenizer.pad_id)
        for (_, _, n), ll in zip(chunk, lls):
            scores.append(float(ll[-n:].double().sum()))
    return [{"loglikelihood": s, "tokens": n, "chars": len(c)} for s, (_, _, n), c in zip(scores, pairs, choices)]


def multiple_choice_accuracy(model, tokenizer, examples: Sequence[dict], batch_size: int = 8,
                             progress: bool = False) -> dict:
    """Accuracy of picking the most likely choice: by total log-likelihood (``accuracy``), per
    character (``accuracy_per_char``) and per token (``accuracy_per_token``)."""
    from tqdm import tqdm

    if not examples:
        raise ValueError("no multiple-choice example to score")
    hits = Counter()
    for ex in tqdm(examples, desc="multiple choice", unit="example", disable=not progress):
        scores = score_choices(model, tokenizer, ex["context"], ex["choices"], batch_size)
        for key, value in (("accuracy", lambda s: s["loglikelihood"]),
                           ("accuracy_per_char", lambda s: s["loglikelihood"] / s["chars"]),
                           ("accuracy_per_token", lambda s: s["loglikelihood"] / s["tokens"])):
            best = max(range(len(scores)), key=lambda i: value(scores[i]))
            hits[key] += best == ex["answer"]
    n = len(examples)
    return {"examples": n, **{k: hits[k] / n for k in ("accuracy", "accuracy_per_char", "accuracy_per_token")}}
