"""Perplexity and multiple-choice accuracy against a direct computation with HF's model."""
import json
import math

import numpy as np
import pytest
import torch

from megallama.data.indexed import IndexedDatasetWriter
from megallama.inference import evaluation
from megallama.tokenizer import HuggingFaceTokenizer, NullTokenizer, SentencePieceTokenizer
from tests.data.helpers import varied_text
from tests.data.test_hf_tokenizer import write_llama3_style_folder
from tests.inference.conftest import WORDS, load_tool, ours_from_hf, random_hf_model, seeded_model, tiny_config


@pytest.fixture(scope="module")
def models():
    config = tiny_config()
    hf = random_hf_model(config)
    return hf, ours_from_hf(hf, config)


def _hf_token_log_probs(hf, ids):
    """log p(ids[t] | ids[<t]) for t >= 1, straight from HF's logits."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1].double()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


def test_perplexity_equals_a_direct_computation(models):
    hf, ours = models
    g = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (30, 7, 1, 12)]
    seq_length = 8
    total, count = 0.0, 0
    for seq in sequences:  # windows of 8 inputs predicting the next 8 tokens
        for start in range(0, len(seq) - 1, seq_length):
            window = seq[start:start + seq_length + 1]
            total -= float(_hf_token_log_probs(hf, window).sum())
            count += len(window) - 1
    report = evaluation.perplexity(ours, sequences, seq_length, batch_size=3)
    assert report["tokens"] == count == 29 + 6 + 11
    assert (report["sequences"], report["too_short"]) == (4, 1)
    assert report["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def _mc_file(tmp_path, lines):
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return str(path)


def test_perplexity_refuses_ids_outside_the_vocabulary(models):
    _, ours = models
    with pytest.raises(ValueError, match="sequence 1 holds token ids outside the model's vocabulary of 320"):
        evaluation.perplexity(ours, [[1, 2, 3], [1, 5, 400]], 16)


def test_multiple_choice_equals_a_direct_computation(models, sp_model, tmp_path):
    hf, ours = models
    tokenizer = SentencePieceTokenizer(sp_model)
    rows = [{"context": "the cat sat on a", "choices": ["mat", "green hills", "dogs"], "answer": 0},
            {"context": "old men watched", "choices": ["quietly", "birds flying over 45"], "answer": "birds flying over 45"},
            {"context": "the river", "choices": ["near", "their small houses", "123"], "answer": 2},
            {"context": "birds", "choices": ["flying", "sat"], "answer": 1}]
    path = _mc_file(tmp_path, rows + ["{broken", {"context": "x", "choices": ["a"], "answer": 0},
                                      {"context": "x", "choices": ["a", "b"], "answer": 5}])
    examples, skipped = evaluation.read_multiple_choice(path)
    assert len(examples) == 4 and sum(skipped.values()) == 3
    expected = {"accuracy": 0, "accuracy_per_char": 0, "accuracy_per_token": 0}
    for ex in examples:
        context = [tokenizer.bos_id] + tokenizer.encode(ex["context"])
        scores = []
        for choice in ex["choices"]:
            continuation = tokenizer.encode(choice)
            ll = float(_hf_token_log_probs(hf, context + continuation)[-len(continuation):].sum())
            scores.append((ll, ll / len(choice), ll / len(continuation)))
        for i, key in enumerate(expected):
            expected[key] += int(np.argmax([s[i] for s in scores])) == ex["answer"]
        got = evaluation.score_choices(ours, tokenizer, ex["context"], ex["choices"], batch_size=2)
        assert [s["loglikelihood"] for s in got] == pytest.approx([s[0] for s in scores], rel=1e-5, abs=1e-5)
    report = evaluation.multiple_choice_accuracy(ours, tokenizer, examples, batch_size=2)
    assert report == {"examples": 4, **{k: v / 4 for k, v in expected.items()}}


def test_a_choice_follows_the_context_after_a_space_under_a_byte_level_tokenizer(tmp_path):
    corpus = varied_text(np.random.default_rng(5), 200) + [" ".join(WORDS)] * 5
    tokenizer = HuggingFaceTokenizer(write_llama3_style_folder(tmp_path / "tok", corpus))
    assert tokenizer.encode("mat") != tokenizer.encode(" mat")  # LLaMA-3's kind: the space is a token's part
    model = seeded_model(tiny_config(vocab_size=tokenizer.vocab_size))
    context, choices = "the cat sat on a", ["mat", "green hills"]
    got = evaluation.score_choices(model, tokenizer, context, choices)
    for choice, score in zip(choices, got):
        ids = [tokenizer.bos_id] + tokenizer.encode(f"{context} {choice}")
        n = len(ids) - 1 - len(tokenizer.encode(context))
        with torch.no_grad():
            log_probs = model(torch.tensor([ids]))[0, :-1].double().log_softmax(-1)
        expected = log_probs.gather(1, torch.tensor(ids[1:])[:, None])[-n:].sum()
        assert score["tokens"] == n
        assert score["loglikelihood"] == pytest.approx(float(expected), rel=1e-5, abs=1e-5)
    # a context's trailing space moves to the choice, as lm-evaluation-harness moves it
    assert evaluation.score_choices(model, tokenizer, context + " ", choices) == got


def test_a_choice_may_fill_every_position(models):
    _, ours = models
    tokenizer = NullTokenizer(320)  # text is ids: a choice of exactly n tokens
    longest = " ".join(["7"] * ours.config.max_position_embeddings)
    scores = evaluation.score_choices(ours, tokenizer, "1 2 3", [longest, "5"])
    assert [s["tokens"] for s in scores] == [96, 1]
    with pytest.raises(ValueError, match="has 97 tokens; it needs 1 to 96"):
        evaluation.score_choices(ours, tokenizer, "1 2 3", [longest + " 7", "5"])


def test_evaluate_cli_on_indexed_data_and_jsonl(models, sp_model, tmp_path, capsys):
    cli = load_tool("evaluate")
    hf, ours = models
    folder = str(tmp_path / "hf")
    hf.save_pretrained(folder)
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (20, 9, 33)]
    prefix = str(tmp_path / "eval_text_document")
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as writer:
        for seq in sequences:
            writer.add_document(seq)
    out = str(tmp_path / "report.json")
    assert cli.main(["--load", folder, "--data-path", prefix, "--seq-length", "16", "--output", out]) == 0
    with open(out) as f:
        report = json.load(f)
    assert report["perplexity"] == pytest.approx(evaluation.perplexity(ours, sequences, 16)["perplexity"], rel=1e-6)

    texts = ["the cat sat on a mat", "birds flying over green hills"]
    jsonl = tmp_path / "valid.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n{not json\n")
    capsys.readouterr()
    assert cli.main(["--load", folder, "--tokenizer-model", sp_model, "--jsonl", str(jsonl)]) == 0
    report = json.loads(capsys.readouterr().out)
    tokenizer = SentencePieceTokenizer(sp_model)
    direct = evaluation.perplexity(ours, [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts], 96)
    assert report["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-6)
    assert report["skipped"] == {"broken JSON": 1}
