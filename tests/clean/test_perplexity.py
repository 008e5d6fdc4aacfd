"""CCNet's n-gram perplexity filter: the model lmplz estimates equals interpolated modified
Kneser-Ney computed independently here, kenlm's scores follow the ARPA, CCNet's normalisation,
fluent text below shuffled words, buckets and their counts in the report, and --workers 2 equal
to one worker."""

import json
import math
import os
import random
import string
import subprocess
import sys
from collections import Counter, defaultdict

import kenlm
import pytest

from megallama.clean import perplexity
from megallama.clean.perplexity import (NgramScorer, bucket_of, normalize_line, parse_buckets, parse_cutoffs,
                                        tokenized_lines, train_ngram_lm)
from megallama.clean.quality import QualityClassifier, train_quality_classifier
from megallama.clean.runner import clean_corpus
from megallama.clean.sources import make_source
from megallama.tokenizer import train_sentencepiece
from tests.clean import inputs
from tests.clean.samples import page

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_arpa(path):
    """{order: {ngram tuple: (log10 prob, log10 backoff)}} of an ARPA file."""
    tables, order = defaultdict(dict), None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("\\") and line.endswith("-grams:"):
                order = int(line[1:-len("-grams:")])
            elif line and order and not line.startswith("\\"):
                fields = line.split("\t")
                words = tuple(fields[1].split())
                tables[order][words] = (float(fields[0]), float(fields[2]) if len(fields) > 2 else 0.0)
            elif line == "\\end\\":
                break
    return tables


def arpa_log10(tables, history, word):
    """log10 p(word | history) by the ARPA backoff rule, written out independently of kenlm."""
    context, backoff = tuple(history), 0.0
    while True:
        ngram = context + (word,)
        if ngram in tables[len(ngram)]:
            return tables[len(ngram)][ngram][0] + backoff
        if not context:
            return tables[1][("<unk>",)][0] + backoff
        backoff += tables[len(context)].get(context, (0.0, 0.0))[1]
        context = context[1:]


def sentence_log10(tables, order, words):
    history, total = ["<s>"], 0.0
    for word in list(words) + ["</s>"]:
        total += arpa_log10(tables, history[-(order - 1):], word)
        history.append(word)
    return total


def kn_corpus():
    """Zipf-distributed words, plus words following exactly 1, 2, 3 or 4 distinct words (so every
    order has the counts-of-counts modified Kneser-Ney's discounts need). Letters only: the
    normalisation maps digits to 0."""
    rng = random.Random(0)
    letters = string.ascii_lowercase
    words = ["w" + a + b for a in letters[:5] for b in letters[:5]]
    corpus = [" ".join(rng.choices(words, weights=[1 / (i + 1) for i in range(len(words))], k=rng.randint(3, 8)))
              for _ in range(150)]
    corpus += [f"a{letters[i]} x{letters[k]}{letters[m]}" for k, copies in {1: 8, 2: 4, 3: 3, 4: 2}.items()
               for m in range(copies) for i in range(k)]
    return corpus


def chen_goodman_discounts(adjusted_counts):
    """D1, D2, D3+ from the counts of adjusted counts 1-4 (Chen & Goodman eq. 26)."""
    n = Counter(c for c in adjusted_counts if c <= 4)
    y = n[1] / (n[1] + 2 * n[2])
    return [0.0] + [j - (j + 1) * y * n[j + 1] / n[j] for j in (1, 2, 3)]


def modified_kneser_ney_bigram(sentences):
    """Interpolated modified Kneser-Ney bigram model written out from the definition: unigrams by
    continuation counts, interpolated with the uniform distribution over the vocabulary (with
    <unk>, without <s>). Returns ({word: log10 p}, {(v, w): log10 p}, {v: log10 backoff}, discounts)."""
    bigrams = Counter((s[i], s[i + 1]) for s in (["<s>"] + x + ["</s>"] for x in sentences) for i in range(len(s) - 1))
    continuation = Counter(w for (_, w) in bigrams)  # distinct left contexts
    d1, d2 = chen_goodman_discounts(continuation.values()), chen_goodman_discounts(bigrams.values())
    vocab = len(continuation) + 1  # + <unk>
    total = sum(continuation.values())
    gamma = sum(d1[min(c, 3)] for c in continuation.values()) / total
    unigram = {w: (c - d1[min(c, 3)]) / total + gamma / vocab for w, c in continuation.items()}
    unigram["<unk>"] = gamma / vocab
    context_total, context_kinds = Counter(), defaultdict(Counter)
    for (v, _), c in bigrams.items():
        context_total[v] += c
        context_kinds[v][min(c, 3)] += 1
    backoff = {v: sum(d2[k] * n for k, n in kinds.items()) / context_total[v] for v, kinds in context_kinds.items()}
    bigram = {(v, w): (c - d2[min(c, 3)]) / context_total[v] + backoff[v] * unigram[w] for (v, w), c in bigrams.items()}
    log = {k: math.log10(p) for k, p in unigram.items()}, {k: math.log10(p) for k, p in bigram.items()}
    return (*log, {v: math.log10(b) for v, b in backoff.items()}, (d1, d2))


@pytest.fixture(scope="module")
def word_lm(tmp_path_factory):
    """A bigram ARPA of kn_corpus through train_ngram_lm, with a SentencePiece word model (one
    piece per corpus word), and the corpus as the pieces the LM was trained on."""
    folder = tmp_path_factory.mktemp("word_lm")
    corpus = kn_corpus()
    tok = train_sentencepiece(corpus, 80, str(folder / "words"), num_threads=1, model_type="word",
                              byte_fallback=False, split_digits=False, hard_vocab_limit=False)
    info = train_ngram_lm(corpus, tok, str(folder / "lm.arpa"), order=2, progress=False)
    assert info["order"] == 2 and info["documents"] == len(corpus)
    return folder / "lm.arpa", [line.split() for line in tokenized_lines(corpus, tok)]


def test_lmplz_probabilities_equal_modified_kneser_ney_computed_independently(word_lm):
    path, sentences = word_lm
    tables = read_arpa(path)
    unigram, bigram, backoff, (d1, d2) = modified_kneser_ney_bigram(sentences)
    assert all(0 < d[j] <= j for d in (d1, d2) for j in (1, 2, 3))  # computed, not lmplz's fallback
    assert {w for (w,) in tables[1]} == set(unigram) | {"<s>"} and set(tables[2]) == set(bigram)
    for w, logp in unigram.items():
        assert tables[1][(w,)][0] == pytest.approx(logp, abs=1e-4), w
    for vw, logp in bigram.items():
        assert tables[2][vw][0] == pytest.approx(logp, abs=1e-4), vw
    for v, logb in backoff.items():
        assert tables[1][(v,)][1] == pytest.approx(logb, abs=1e-4), v


def test_kenlm_scores_follow_the_arpa_and_sum_to_one(word_lm):
    path, sentences = word_lm
    tables, model = read_arpa(path), kenlm.Model(str(path))
    vocab = [w for (w,) in tables[1] if w != "<s>"]  # </s> and <unk> included
    for history in (["<s>"], ["▁wab"], ["▁aa"], ["▁xbc"], ["▁unseen"]):
        total = sum(10 ** arpa_log10(tables, history, w) for w in vocab)
        assert total == pytest.approx(1.0, abs=1e-4), (history, total)
    for sentence in [" ".join(sentences[0]), " ".join(sentences[-1]), "▁waa ▁xbc ▁ab", "▁unseen ▁words"]:
        assert model.score(sentence) == pytest.approx(sentence_log10(tables, 2, sentence.split()), abs=1e-4)


def test_normalize_line_is_ccnets_normalisation():
    # lower case, accents off, digits (any script's) to 0, CCNet's punctuation table, controls removed
    assert normalize_line("  Héllo WORLD, 1984 — “Quoted” …\x07 ") == 'hello world, 0000  -  "quoted" ...'
    assert normalize_line("Zürich ２０２３年，東京。") == "zurich 0000年,東京."
    assert normalize_line("PLAIN ascii 42\tTAB") == "plain ascii 00tab"
    assert normalize_line("   ") == ""


@pytest.fixture(scope="module")
def english_lm(tmp_path_factory):
    """A 5-gram BPE-piece model of English sample pages, with cut-offs from a sample of pages."""
    folder = tmp_path_factory.mktemp("english_lm")
    rng = random.Random(1)
    wiki = [page(rng) for _ in range(300)]
    inputs.write_jsonl(str(folder / "wiki.jsonl"), [{"text": t} for t in wiki])
    inputs.write_jsonl(str(folder / "sample.jsonl"), [{"text": text} for _, text in mixed_pages(rng, 60)])
    tok = train_sentencepiece([normalize_line(line) for t in wiki for line in t.split("\n")], 400,
                              str(folder / "tok"), num_threads=1)
    done = subprocess.run([sys.executable, "tools/train_ngram_lm.py", "--input", str(folder / "wiki.jsonl"),
                           "--tokenizer-model", tok, "--output", str(folder / "lm.bin"),
                           "--percentiles-from", str(folder / "sample.jsonl")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "buckets from 60 sample documents" in done.stdout
    return folder / "lm.bin"


def shuffled(text, rng):
    words = text.split()
    rng.shuffle(words)
    return "\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12))


def test_train_tool_writes_a_kenlm_binary_its_tokenizer_and_cutoffs(english_lm):
    info = json.loads(open(str(english_lm) + ".json").read())
    assert info["order"] == 5 and info["documents"] == 300 and os.path.isfile(str(english_lm) + ".sp.model")
    cut = info["cutoffs"]
    assert cut["percentiles"] == [30, 60] and 0 < cut["head"] <= cut["tail"] and cut["sample_docs"] == 60
    assert kenlm.Model(str(english_lm)).order == 5


def test_fluent_text_has_a_lower_perplexity_than_its_words_shuffled(english_lm):
    scorer = NgramScorer(str(english_lm))
    rng = random.Random(2)
    for _ in range(10):
        text = page(rng)
        assert scorer.perplexity(text) < scorer.perplexity(shuffled(text, rng)) / 2
    # the figure is CCNet's: 10 ** (-sum of log10 / (pieces + one end per paragraph))
    text = "The museum opened a new exhibition.\nEngineers tested the bridge."
    log10, length = scorer.log_score(text)
    assert scorer.perplexity(text) == round(10 ** (-log10 / length), 1)
    sp = scorer._sp
    pieces = [sp.encode(normalize_line(line), out_type=str) for line in text.split("\n")]
    assert length == sum(len(p) + 1 for p in pieces)
    lm = kenlm.Model(str(english_lm))
    assert log10 == pytest.approx(sum(lm.score(" ".join(p)) for p in pieces), abs=1e-9)


def noisy(text, rng, share):
    """`text` with `share` of its words replaced by random words of the same text."""
    words = text.split()
    return " ".join(rng.choice(words) if rng.random() < share else w for w in words)


def mixed_pages(rng, n):
    """(kind, text): pages with up to 8% of their words replaced ("clean"), with 15-40% replaced
    ("noisy"), and pages of shuffled words."""
    out = []
    for d in range(n):
        text = page(rng, lines=8)
        kind = ("clean", "noisy", "shuffled")[d % 3]
        out.append((kind, noisy(text, rng, rng.uniform(0, 0.08)) if kind == "clean" else
                    noisy(text, rng, rng.uniform(0.15, 0.4)) if kind == "noisy" else shuffled(text, rng)))
    return out


def mixed_shards(folder, rng, shards=3, per_shard=12):
    paths, kinds = [], {}
    for s in range(shards):
        rows = []
        for d, (kind, text) in enumerate(mixed_pages(rng, per_shard)):
            kinds[f"s{s}/{d}"] = kind
            rows.append({"url": f"s{s}/{d}", "text": text})
        path = folder / f"cc-{s}.jsonl"
        inputs.write_jsonl(str(path), rows)
        paths.append(str(path))
    return paths, kinds


def rows(folder):
    return [json.loads(line) for name in sorted(os.listdir(folder)) if name.endswith(".jsonl")
            for line in (folder / name).read_text().splitlines()]


def test_buckets_are_labelled_kept_and_counted_per_bucket_on_a_mixed_corpus(tmp_path, english_lm):
    paths, kinds = mixed_shards(tmp_path, random.Random(3))
    source = make_source("commoncrawl", perplexity_model=str(english_lm))
    report = clean_corpus(source, paths, str(tmp_path / "out"), str(tmp_path / "r.json"),
                          keep_rejected=str(tmp_path / "rej"), progress=False)
    kept, rejected = rows(tmp_path / "out"), rows(tmp_path / "rej")
    scored = kept + [r for r in rejected if "bucket" in r["meta"]]
    scorer, cutoffs = NgramScorer(str(english_lm)), source.perplexity.cutoffs
    for row in scored:  # each label is the figure recomputed here, and its bucket by the cut-offs
        assert row["meta"]["perplexity"] == scorer.perplexity(row["text"])
        assert row["meta"]["bucket"] == bucket_of(row["meta"]["perplexity"], cutoffs)
    assert {r["meta"]["bucket"] for r in kept} <= {"head", "middle"}
    dropped = Counter(r["meta"]["reason"] for r in rejected if r["meta"]["reason"].startswith("perplexity_"))
    assert dropped == Counter(f"perplexity_{r['meta']['bucket']}" for r in scored if r not in kept)
    assert {k: v for k, v in report["dropped"].items() if k.startswith("perplexity_")} == dict(dropped)
    buckets = Counter(r["meta"]["bucket"] for r in scored)
    assert min(buckets[b] for b in ("head", "middle", "tail")) > 0, buckets
    assert all(r["meta"]["bucket"] == "tail" for r in scored if kinds[r["meta"]["url"]] == "shuffled")
    mean = {k: sum(r["meta"]["perplexity"] for r in scored if kinds[r["meta"]["url"]] == k)
            / sum(1 for r in scored if kinds[r["meta"]["url"]] == k) for k in ("clean", "noisy", "shuffled")}
    assert mean["clean"] < mean["noisy"] < mean["shuffled"], mean
    assert report["output_docs"] == len(kept) > 0
    # keeping every bucket drops nothing for perplexity, labels the same figures
    source_all = make_source("commoncrawl", perplexity_model=str(english_lm), perplexity_buckets="head,middle,tail",
                             perplexity_cutoffs=cutoffs)
    report_all = clean_corpus(source_all, paths, str(tmp_path / "all"), str(tmp_path / "all.json"), progress=False)
    assert report_all["output_docs"] == len(scored)
    assert not [k for k in report_all["dropped"] if k.startswith("perplexity_")]


def test_two_workers_give_the_output_of_one(tmp_path, english_lm):
    paths, _ = mixed_shards(tmp_path, random.Random(4), shards=4, per_shard=8)
    outputs = []
    for workers in (1, 2):
        source = make_source("commoncrawl", perplexity_model=str(english_lm))
        report = clean_corpus(source, paths, str(tmp_path / f"w{workers}"), str(tmp_path / f"r{workers}.json"),
                              workers=workers, progress=False)
        files = sorted(n for n in os.listdir(tmp_path / f"w{workers}") if n.endswith(".jsonl"))
        outputs.append((report, [(tmp_path / f"w{workers}" / n).read_bytes() for n in files]))
    assert outputs[0] == outputs[1]
    assert any(k.startswith("perplexity_") for k in outputs[0][0]["dropped"])


def test_bad_perplexity_settings_are_one_line_errors(tmp_path, english_lm):
    with pytest.raises(ValueError, match="not github"):
        make_source("github", perplexity_model=str(english_lm))
    with pytest.raises(ValueError, match="must be among head, middle, tail"):
        parse_buckets("head,top")
    with pytest.raises(ValueError, match="HEAD,TAIL"):
        parse_cutoffs("300")
    with pytest.raises(ValueError, match="need a perplexity model"):
        make_source("commoncrawl", perplexity_buckets="head")
    bare = tmp_path / "bare.bin"
    bare.write_bytes(english_lm.read_bytes())
    (tmp_path / "bare.bin.sp.model").write_bytes(open(str(english_lm) + ".sp.model", "rb").read())
    with pytest.raises(ValueError, match="no stored perplexity cut-offs"):
        make_source("commoncrawl", perplexity_model=str(bare))
    with pytest.raises(FileNotFoundError, match="perplexity model not found"):
        make_source("commoncrawl", perplexity_model=str(tmp_path / "missing.bin"))
    assert math.isfinite(make_source("c4", perplexity_model=str(bare), perplexity_cutoffs="10,20")
                         .perplexity.scorer.perplexity("A short text."))


def test_cli_filters_by_perplexity_bucket_and_quality_threshold(tmp_path, english_lm):
    rng = random.Random(5)
    spam_words = "buy cheap best deal click now free casino bonus win prize offer discount online shop".split()
    refs = [page(rng, "en", 8) for _ in range(150)]
    spam = [" ".join(rng.choices(spam_words, k=60)) + "." for _ in range(150)]
    quality = str(tmp_path / "quality.bin")
    train_quality_classifier(refs, spam, quality, epoch=10, dim=16, bucket=20000)
    paths, _ = mixed_shards(tmp_path, random.Random(6), shards=1, per_shard=24)
    scores = sorted(QualityClassifier(quality).score(json.loads(line)["text"]) for line in open(paths[0]))
    threshold = scores[len(scores) // 2]  # about half the pages score below it
    argv = [sys.executable, "tools/clean_corpus.py", "--source", "commoncrawl", "--input", *paths,
            "--output", str(tmp_path / "out"), "--report", str(tmp_path / "r.json"), "--keep-rejected", str(tmp_path / "rej"),
            "--perplexity-model", str(english_lm), "--perplexity-buckets", "head,middle",
            "--quality-model", quality, "--quality-threshold", str(threshold)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert "perplexity_tail" in done.stdout and report["dropped"]["perplexity_tail"] > 0
    kept, rejected = rows(tmp_path / "out"), rows(tmp_path / "rej")
    # (meta holds the score rounded to 4 decimals)
    assert kept and all(r["meta"]["quality_score"] >= threshold - 1e-4 and r["meta"]["bucket"] != "tail" for r in kept)
    low = [r for r in rejected if r["meta"]["reason"] == "low_quality"]
    assert low and all(r["meta"]["quality_score"] < threshold + 1e-4 for r in low)
    bad = subprocess.run(argv[:-1] + ["1.5"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error: quality threshold")


def test_missing_lmplz_says_how_to_build_it(tmp_path, monkeypatch, english_lm):
    monkeypatch.setattr(perplexity, "DEFAULT_KENLM_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("MEGALLAMA_KENLM_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="run `bash tools/build_kenlm.sh`"):
        train_ngram_lm(["Some text."], str(english_lm) + ".sp.model", str(tmp_path / "lm.arpa"), progress=False)


def test_an_unreadable_input_fails_at_once_instead_of_hanging(tmp_path, english_lm):
    # lmplz waited for the rest of its input forever after the reader raised (a file cut short, here)
    import gzip

    whole = gzip.compress(b"".join(json.dumps({"text": page(random.Random(i))}).encode() + b"\n" for i in range(50)))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[:len(whole) // 2])
    done = subprocess.run([sys.executable, "tools/train_ngram_lm.py", "--input", str(cut),
                           "--tokenizer-model", str(english_lm) + ".sp.model", "--output", str(tmp_path / "lm.bin")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and str(cut) in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
    assert os.listdir(tmp_path) == ["cut.jsonl.gz"]
    cut.unlink()
    (tmp_path / "afile").write_text("")
    (tmp_path / "wiki.jsonl").write_text('{"text": "Some text."}\n')
    done = subprocess.run([sys.executable, "tools/train_ngram_lm.py", "--input", str(tmp_path / "wiki.jsonl"),
                           "--tokenizer-model", str(english_lm) + ".sp.model", "--output", str(tmp_path / "afile" / "lm.bin")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        f"error: --output: cannot make the folder {tmp_path / 'afile'}: a file is in the way")


def test_bad_input_lines_are_counted_as_by_the_other_data_tools_and_strict_fails_on_them(tmp_path, english_lm):
    wiki = tmp_path / "wiki.jsonl"
    wiki.write_text('{"text": "Some text."}\n{"text": \n{"title": "no text"}\n'
                    + json.dumps({"text": page(random.Random(0))}) + "\n")
    tool = [sys.executable, "tools/train_ngram_lm.py", "--input", str(wiki), "--tokenizer-model",
            str(english_lm) + ".sp.model", "--order", "2", "--output"]
    done = subprocess.run([*tool, str(tmp_path / "lm.arpa")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # the reasons and wording of megallama.data.jsonl, as train_tokenizer.py and train_quality_classifier.py
    assert done.stdout.splitlines()[-1] == "  skipped lines: 1 broken JSON, 1 missing key 'text'"
    done = subprocess.run([*tool, str(tmp_path / "strict" / "lm.arpa"), "--strict"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == f"error: {wiki}:2: broken JSON"
    assert os.listdir(tmp_path / "strict") == []
    # no text at all: the lines skipped say why
    done = subprocess.run([*tool, str(tmp_path / "body" / "lm.arpa"), "--json-key", "body"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1] == (
        "error: no text to train on (no input document has a non-blank line); skipped lines: 3 missing key 'body', "
        "1 broken JSON")
    # quoted globs are the tool's to expand; one matching nothing is named with its flag
    globbed = [*tool[:3], str(tmp_path / "wik*.jsonl"), *tool[4:], str(tmp_path / "glob" / "lm.arpa"),
               "--percentiles-from", str(tmp_path / "cc*.jsonl")]
    done = subprocess.run(globbed, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == f"error: --percentiles-from '{tmp_path}/cc*.jsonl' matches no file"
    done = subprocess.run(globbed[:-2], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_bad_sample_or_a_folder_as_output_leaves_no_model(tmp_path, english_lm):
    tok = str(english_lm) + ".sp.model"

    def unreadable_sample():
        raise FileNotFoundError("sample.jsonl")
        yield

    with pytest.raises(FileNotFoundError, match="sample.jsonl"):
        train_ngram_lm([page(random.Random(0))], tok, str(tmp_path / "lm.bin"), sample=unreadable_sample(), progress=False)
    assert os.listdir(tmp_path) == []  # no model without its cut-offs
    (tmp_path / "lm").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        train_ngram_lm([page(random.Random(0))], tok, str(tmp_path / "lm"), progress=False)
    assert os.listdir(tmp_path) == ["lm"]


def test_the_binary_model_gets_the_umask_mode(tmp_path, english_lm):
    old = os.umask(0o002)
    try:
        train_ngram_lm([page(random.Random(0))], str(english_lm) + ".sp.model", str(tmp_path / "lm.bin"), progress=False)
    finally:
        os.umask(old)
    assert {n: os.stat(tmp_path / n).st_mode & 0o777 for n in os.listdir(tmp_path)} == dict.fromkeys(
        ["lm.bin", "lm.bin.sp.model", "lm.bin.json"], 0o664)
