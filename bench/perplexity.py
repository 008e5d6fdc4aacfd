#!/usr/bin/env python
"""Benchmark: scoring documents with CCNet's n-gram perplexity (megallama.clean.perplexity)
against CCNet's own scoring loop, on the same documents and the same KenLM model.

The model: SentencePiece (unigram, as CCNet) and a 5-gram KenLM model from lmplz, trained on the
language reference shipped with Python (`pydoc_data.topics`, standing in for Wikipedia). The
documents: the docstrings of the standard library, one page per module (the demo's CommonCrawl).
Nothing is downloaded.

The peer is CCNet's loop written out as CCNet runs it (cc_net/perplexity.py `DocLM.do` with its
`text_normalizer.normalize` per line, SentencePiece `encode_as_pieces` per line, `" ".join`,
`kenlm.Model.score`, length `len(line.split()) + 1`, `10 ** (-sum / length)` rounded to 0.1).
Both sides give the same perplexity for every document (checked); both run in one thread; the
sides alternate and each keeps its best of --repeats passes. Prints docs/s of each and the ratio
(target >= 1.0).

  python bench/perplexity.py --docs 2000
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import unicodedata

from benchlib import add_json_flag, ratio_row, write_json
from megallama.clean.perplexity import NgramScorer, normalize_line, train_ngram_lm
from megallama.tokenizer import train_sentencepiece

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from demo_corpus import docstring_pages, pydoc_topic_rows  # noqa: E402  (examples/demo_corpus.py: the demo's pages)

# -- CCNet's text_normalizer.normalize and DocLM loop, as cc_net writes them ----------------------
UNICODE_PUNCT = {
    "，": ",", "。": ".", "、": ",", "„": '"', "”": '"', "“": '"', "«": '"', "»": '"', "１": '"',
    "」": '"', "「": '"', "《": '"', "》": '"', "´": "'", "∶": ":", "：": ":", "？": "?", "！": "!",
    "（": "(", "）": ")", "；": ";", "–": "-", "—": " - ", "．": ". ", "～": "~", "’": "'",
    "…": "...", "━": "-", "〈": "<", "〉": ">", "【": "[", "】": "]", "％": "%", "►": "-",
}
NON_PRINTING_CHARS_RE = re.compile(f"[{''.join(map(chr, list(range(0, 32)) + list(range(127, 160))))}]")
DIGIT_RE = re.compile(r"\d")


def ccnet_replace_unicode_punct(text: str) -> str:
    return "".join(UNICODE_PUNCT.get(c, c) for c in text)


def ccnet_strip_accents(line: str) -> str:
    nfd = unicodedata.normalize("NFD", line)
    output = [c for c in nfd if unicodedata.category(c) != "Mn"]
    if len(output) == line:  # (sic) cc_net compares a length with the line: never true
        return line
    return "".join(output)


def ccnet_normalize(line: str) -> str:
    line = line.strip()
    if not line:
        return line
    line = line.lower()
    line = ccnet_strip_accents(line)
    line = DIGIT_RE.sub("0", line)
    line = ccnet_replace_unicode_punct(line)
    return NON_PRINTING_CHARS_RE.sub("", line)


def ccnet_perplexity(model, sp, document: str) -> float:
    doc_log_score, doc_length = 0, 0
    for line in document.split("\n"):
        line = " ".join(sp.encode_as_pieces(ccnet_normalize(line)))
        log_score = model.score(line)
        length = len(line.split()) + 1
        doc_log_score += log_score
        doc_length += length
    return round(10.0 ** (-doc_log_score / doc_length), 1)


def build_model(folder: str, vocab_size: int) -> str:
    """SentencePiece + 5-gram KenLM binary over the language reference."""
    wiki = [row["text"] for row in pydoc_topic_rows()]
    tok = train_sentencepiece([normalize_line(line) for t in wiki for line in t.split("\n") if line.strip()],
                              vocab_size, os.path.join(folder, "wiki"), num_threads=1, model_type="unigram",
                              split_digits=False, byte_fallback=False, hard_vocab_limit=False)
    model = os.path.join(folder, "en.bin")
    train_ngram_lm(wiki, tok, model, order=5, progress=False)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=2000, help="documents scored per pass (repeated from the pages)")
    p.add_argument("--repeats", type=int, default=3, help="passes per side; each keeps its best")
    p.add_argument("--vocab-size", type=int, default=4000)
    add_json_flag(p)
    args = p.parse_args(argv)

    pages = [row["text"] for row in docstring_pages(10 ** 8, {})]
    docs = [pages[i % len(pages)] for i in range(args.docs)]
    with tempfile.TemporaryDirectory() as tmp:
        model_path = build_model(tmp, args.vocab_size)
        import kenlm
        import sentencepiece

        ours = NgramScorer(model_path)
        ours.load()
        lm, sp = kenlm.Model(model_path), sentencepiece.SentencePieceProcessor(model_file=ours.tokenizer_path)
        sides = {"ccnet": lambda d: ccnet_perplexity(lm, sp, d), "megallama": ours.perplexity}
        expected = [sides["ccnet"](d) for d in docs[:len(pages)]]
        got = [sides["megallama"](d) for d in docs[:len(pages)]]
        mismatches = sum(a != b for a, b in zip(expected, got))
        if mismatches:
            print(f"error: {mismatches} of {len(expected)} perplexities differ from CCNet's", file=sys.stderr)
            return 1
        best = {name: float("inf") for name in sides}
        for _ in range(args.repeats):
            for name, score in sides.items():
                start = time.perf_counter()
                for d in docs:
                    score(d)
                best[name] = min(best[name], time.perf_counter() - start)
    rate = {name: args.docs / seconds for name, seconds in best.items()}
    ratio = rate["megallama"] / rate["ccnet"]
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"{args.docs} documents ({mb:.1f} MB, {len(pages)} distinct pages), 5-gram KenLM, one thread, "
          f"best of {args.repeats}; perplexities identical on every page")
    for name in sides:
        print(f"  {name:10s} {rate[name]:9.1f} docs/s")
    print(f"  ratio megallama / CCNet loop: {ratio:.2f}x (target >= 1.0)")
    write_json(args.json, [ratio_row("perplexity scoring (CCNet n-gram filter)", f"docs/s, {args.docs} pages, 1 thread",
                                     "CCNet DocLM loop (kenlm + sentencepiece)", ratio, "≥ 1.0×")],
               {"docs": args.docs, "distinct_pages": len(pages), "megabytes": mb, "repeats": args.repeats,
                "docs_per_s": rate, "seconds": best})
    return 0


if __name__ == "__main__":
    sys.exit(main())
