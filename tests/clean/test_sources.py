"""Each source cleaner on small inputs in its real download format, through the runner."""

import gzip
import json
import os
import random
import tarfile

from megallama.clean.runner import clean_corpus
from megallama.clean.sources.arxiv import clean_latex
from megallama.clean.sources.books import strip_gutenberg_boilerplate
from megallama.clean.sources.github import licence_allowed, remove_licence_header
from tests.clean import inputs
from tests.clean.samples import SENTENCES, page, paragraph


def run(source, paths, tmp_path, **kw):
    out = tmp_path / f"out-{source}"
    report = clean_corpus(source, [str(p) for p in paths], str(out), str(tmp_path / f"{source}.json"),
                          progress=False, **kw)
    docs = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".jsonl"):
            with open(out / name, encoding="utf-8") as f:
                docs += [json.loads(line) for line in f]
    assert report["input_docs"] == report["output_docs"] + sum(report["dropped"].values())
    assert report["output_docs"] == len(docs)
    assert json.loads((tmp_path / f"{source}.json").read_text()) == report
    return docs, report


def test_commoncrawl_wet_warc_and_jsonl(tmp_path):
    rng = random.Random(0)
    boiler = "Copyright 2024 Example Media Group. All rights reserved worldwide."
    pages = [page(rng) + "\n" + boiler for _ in range(3)]
    inputs.write_wet(str(tmp_path / "a.warc.wet.gz"),
                     [(f"http://a/{i}", p) for i, p in enumerate(pages[:2])] + [("http://a/bad", b"caf\xe9 latin-1 bytes")]
                     + [("http://a/2", pages[2]), ("http://a/de", page(rng, "de"))])
    inputs.write_warc_html(str(tmp_path / "b.warc.gz"), [
        ("http://b/0", "<html><head><script>var x;</script></head><body><p>" + "</p><p>".join(page(rng).split("\n"))
         + f"</p><p>{boiler}</p></body></html>")])
    inputs.write_jsonl(str(tmp_path / "c.jsonl"), [
        {"url": "http://c/dup", "text": pages[0]},         # exact duplicate of an earlier page
        {"url": "http://c/short", "text": "Too short to keep."},
        {"url": "http://c/html", "text": "<div>" + paragraph(rng, "en", 6) + "</div><!-- x --><p>" + boiler + "</p>"},
        {"url": "http://c/none"},
    ], raw_lines={1: b"{not json", 2: b'{"text": "bad \xff utf8"}'})
    docs, report = run("commoncrawl", sorted(tmp_path.glob("*.*")), tmp_path)
    assert report["dropped"] == {"bad_json": 1, "bad_utf8": 2, "duplicate": 1, "language": 1, "missing_text": 1,
                                 "too_short": 1}
    assert [d["meta"]["url"] for d in docs] == ["http://a/0", "http://a/1", "http://a/2", "http://b/0", "http://c/html"]
    assert sum(boiler in d["text"] for d in docs) == 1  # line dedup over the whole input: first kept
    assert boiler in docs[0]["text"]
    assert all(d["meta"]["lang"] == "en" and d["meta"]["lang_score"] >= 0.5 for d in docs)
    assert "<" not in docs[-1]["text"] and "var x" not in docs[3]["text"]


def test_c4_heuristics_dedup_and_language(tmp_path):
    rng = random.Random(1)
    good = [page(rng) for _ in range(3)]
    rows = [{"text": good[0] + "\nPlease enable Javascript to continue.\nMenu", "url": "u0", "timestamp": "2019"},
            {"text": good[1] + "\nLorem ipsum dolor sit amet, consectetur.", "url": "u1"},
            {"text": good[2], "url": "u2"},
            {"text": good[2], "url": "u3"},
            {"text": page(rng, "fr"), "url": "u4"},
            # passes C4's rules alone, but after line dedup only its last sentence is left
            {"text": "\n".join(good[2].split("\n")[:5] + ["A new closing sentence, seen only here."]), "url": "u5"}]
    inputs.write_jsonl(str(tmp_path / "c4-train.00000-of-01024.json.gz"), rows)
    docs, report = run("c4", [tmp_path / "c4-train.00000-of-01024.json.gz"], tmp_path)
    assert report["dropped"] == {"duplicate": 1, "language": 1, "lorem_ipsum": 1, "too_few_sentences": 1}
    assert [d["meta"]["url"] for d in docs] == ["u0", "u2"]
    assert "javascript" not in docs[0]["text"].lower() and "Menu" not in docs[0]["text"]
    assert docs[0]["meta"]["timestamp"] == "2019"


def test_github_licences_extensions_headers_and_dedup(tmp_path):
    header = "# Copyright (c) 2020 Someone\n# Licensed under the MIT License.\n\n"
    code = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"
    c_header = "/*\n * Copyright 2019 ACME\n * SPDX-License-Identifier: Apache-2.0\n */\n#include <stdio.h>\n"
    rows = [
        {"repo_name": "a/x", "path": "src/add.py", "license": "mit", "content": "#!/usr/bin/env python\n" + header + code},
        {"repo_name": "b/y", "path": "add.py", "license": "apache-2.0",  # the same file once headers are removed
         "content": "#!/usr/bin/env python\n# SPDX-License-Identifier: Apache-2.0\n" + code},
        {"repo_name": "c/z", "path": "main.c", "license": "bsd-3-clause", "content": c_header + "int main(void) { return 0; }\n"},
        {"repo_name": "d/w", "path": "gpl.py", "license": "gpl-3.0", "content": code},
        {"repo_name": "e/v", "path": "data.bin", "license": "mit", "content": "abc def\n"},
        {"repo_name": "f/u", "path": "min.js", "license": "mit", "content": "var a=" + "1," * 600 + "2;\n"},
        {"repo_name": "g/t", "path": "x.py", "license": "mit"},
    ]
    inputs.write_jsonl(str(tmp_path / "github.jsonl"), rows)
    docs, report = run("github", [tmp_path / "github.jsonl"], tmp_path)
    assert report["dropped"] == {"duplicate": 1, "extension": 1, "license": 1, "long_line": 1, "missing_text": 1}
    assert [d["meta"]["id"] for d in docs] == ["a/x/src/add.py", "c/z/main.c"]
    assert docs[0]["text"] == "#!/usr/bin/env python\n" + code
    assert docs[1]["text"] == "#include <stdio.h>\nint main(void) { return 0; }\n"
    assert docs[0]["meta"]["language"] == "python"
    assert licence_allowed("BSD-2-Clause") and not licence_allowed("lgpl-2.1") and not licence_allowed(None)
    assert remove_licence_header("# a normal comment\nx = 1\n", "python") == "# a normal comment\nx = 1\n"


def test_wikipedia_dump_plain_and_bz2_with_a_broken_page(tmp_path):
    rng = random.Random(2)
    body = paragraph(rng, "en", 5)
    article = ("{{Infobox city|name=Springfield}}\n'''Springfield''' is a [[city|town]] in [[Oregon]]."
               "<ref>{{cite web|url=http://x}}</ref> <!-- editors: hidden -->\n== History ==\n" + body +
               "\n{| class=\"wikitable\"\n|-\n| cell one || cell two\n|}\n[[Category:Cities]]\n[[File:Map.png|thumb|A map]]")
    pages = [inputs.wiki_page(1, "Springfield", article),
             inputs.wiki_page(2, "Springfield, OR", "", redirect="Springfield"),
             inputs.wiki_page(3, "Talk:Springfield", "talk " + body, ns=1),
             "  <page>\n    <title>Broken</titl>\n  </page>\n",
             inputs.wiki_page(4, "After broken", body)]
    inputs.write_wiki_dump(str(tmp_path / "enwiki-20220601-pages-articles.xml"), pages)
    de = "'''Berlin''' ist die [[Hauptstadt]] Deutschlands. " + paragraph(rng, "de", 4) + "\n[[Kategorie:Stadt]]"
    inputs.write_wiki_dump(str(tmp_path / "dewiki.xml.bz2"), [inputs.wiki_page(7, "Berlin", de)], lang="de",
                           category="Kategorie")
    inputs.write_wiki_dump(str(tmp_path / "jawiki.xml"), [inputs.wiki_page(9, "東京", "東京は日本の首都です。")], lang="ja")
    docs, report = run("wikipedia", [tmp_path], tmp_path)
    assert report["dropped"] == {"bad_xml": 1, "language": 1, "not_article": 1, "redirect": 1}
    by_title = {d["meta"]["title"]: d for d in docs}
    assert sorted(by_title) == ["After broken", "Berlin", "Springfield"]
    text = by_title["Springfield"]["text"]
    assert text.startswith("Springfield is a town in Oregon.") and "History" in text and body in text
    for gone in ("Infobox", "cite", "hidden", "cell", "Category", "Map", "thumb", "[[", "{{"):
        assert gone not in text
    assert "Kategorie" not in by_title["Berlin"]["text"] and by_title["Berlin"]["meta"]["wiki_lang"] == "de"
    assert by_title["Springfield"]["meta"]["url"] == "https://en.wikipedia.org/wiki/Springfield"


def test_books_gutenberg_boilerplate_and_near_duplicates(tmp_path):
    rng = random.Random(3)
    vocab = sorted({w for s in SENTENCES["en"] for w in s.split()})
    books = [" ".join(rng.choices(vocab, k=4000)) for _ in range(2)]
    header = "The Project Gutenberg eBook of A Book\n\nTitle: A Book\n\n*** START OF THE PROJECT GUTENBERG EBOOK A BOOK ***\n"
    footer = "\n*** END OF THE PROJECT GUTENBERG EBOOK A BOOK ***\n\nSection 1. General Terms of Use and licence.\n"
    edited = " ".join(w if i % 400 else "changed" for i, w in enumerate(books[0].split()))
    for name, text in [("10.txt", header + books[0] + footer), ("11.txt", books[1]), ("12.txt", header + edited + footer)]:
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "13.txt").write_bytes(b"Bad \xff\xfe bytes")
    docs, report = run("books", [tmp_path], tmp_path)
    assert report["dropped"] == {"bad_utf8": 1, "near_duplicate": 1}
    assert [d["meta"]["id"] for d in docs] == ["10", "11"]
    assert docs[0]["text"] == books[0] and docs[0]["meta"]["title"] == "A Book"
    assert strip_gutenberg_boilerplate("no markers at all") == "no markers at all"


TEX = r"""\documentclass{article}
\usepackage{amsmath}
\newcommand{\R}{\mathbb{R}}
\newcommand{\norm}[1]{\left\lVert #1 \right\rVert}
\newcommand{\ip}[2]{\langle #1, #2 \rangle}
\newcommand{\opt}[2][k]{f_{#1}(#2)}
\def\eps{\varepsilon}
\def\sq#1{{#1}^2}
\begin{document}
\title{A paper}\maketitle
\begin{abstract}We study things.\end{abstract}
\section{Introduction} % why this matters
Let $x \in \R$ with $\norm{x} < \eps$ and $\ip{x}{\norm{y}}$, also $\opt{z}$, $\opt[j]{w}$, $\sq{a}$; 50\% done.
%\section{Commented out}
\section{Method}
We proceed.
\begin{thebibliography}{9}\bibitem{a} A. Author.\end{thebibliography}
\end{document}
"""
EXPANDED = (r"\section{Introduction}" "\n"
            r"Let $x \in \mathbb{R}$ with $\left\lVert x \right\rVert < \varepsilon$ and "
            r"$\langle x, \left\lVert y \right\rVert \rangle$, also $f_{k}(z)$, $f_{j}(w)$, ${a}^2$; 50\% done."
            "\n\n" r"\section{Method}" "\nWe proceed.")


def test_clean_latex_expands_macros_with_arguments():
    assert clean_latex(TEX) == (EXPANDED, None)
    assert clean_latex(r"\documentclass{article}\begin{document}No sections.\end{document}") == ("", "no_section")


def test_arxiv_tex_folder_and_tarballs(tmp_path):
    (tmp_path / "2301.00001.tex").write_text(TEX)
    papers = tmp_path / "papers"
    paper = papers / "2301.00002"
    paper.mkdir(parents=True)
    (paper / "main.tex").write_text("\\documentclass{article}\\newcommand{\\N}{\\mathbb{N}}\n\\begin{document}\\input{sec}\n")
    (paper / "sec.tex").write_text("\\section{Only}\nNumbers $\\N$ here.\n\\end{document}\n")
    (papers / "2301.00003.tar.gz").write_bytes(inputs.tar_bytes({"paper/ms.tex": TEX.encode()}, "gz"))
    with tarfile.open(papers / "arXiv_src_2301_001.tar", "w") as bulk:
        inputs.add_to_tar(bulk, "2301/2301.00004.gz", gzip.compress(TEX.encode()))
        inputs.add_to_tar(bulk, "2301/2301.00005.gz", gzip.compress(inputs.tar_bytes({"a.tex": TEX.encode()})))
        inputs.add_to_tar(bulk, "2301/2301.00006.pdf", b"%PDF-1.4")
        inputs.add_to_tar(bulk, "2301/2301.00007.gz", b"not gzip at all")
        inputs.add_to_tar(bulk, "2301/2301.00008.gz", gzip.compress(b"\\documentclass{article} no sections"))
    docs, report = run("arxiv", [tmp_path / "2301.00001.tex", papers], tmp_path)
    assert report["dropped"] == {"bad_archive": 1, "no_section": 1, "no_tex": 1}
    ids = [d["meta"]["id"] for d in docs]
    assert ids == ["2301.00001", "2301.00002", "2301.00003", "2301.00004", "2301.00005"]
    assert all(d["text"] == EXPANDED for d in docs if d["meta"]["id"] != "2301.00002")
    assert docs[1]["text"] == "\\section{Only}\nNumbers $\\mathbb{N}$ here.\n\\end{document}"


def test_stackexchange_threads_sorted_by_score(tmp_path):
    site = tmp_path / "cooking.stackexchange.com"
    site.mkdir()
    rows = [
        {"Id": 1, "PostTypeId": 1, "Score": 5, "Title": "How long to boil an egg?",
         "Body": "<p>I want a <b>soft</b> egg &amp; toast.</p>"},
        {"Id": 2, "PostTypeId": 2, "ParentId": 1, "Score": 1, "Body": "<p>Low answer.</p>"},
        {"Id": 3, "PostTypeId": 2, "ParentId": 1, "Score": 10, "Body": "<p>Top answer: six minutes.</p><pre><code>timer 6m\n  done</code></pre>"},
        {"Id": 4, "PostTypeId": 2, "ParentId": 1, "Score": 3, "Body": "<p>Middle answer.</p>"},
        {"Id": 5, "PostTypeId": 1, "Score": 0, "Title": "Unanswered?", "Body": "<p>Nobody knows.</p>"},
        {"Id": 6, "PostTypeId": 2, "ParentId": 99, "Score": 2, "Body": "<p>Orphan.</p>"},
        {"Id": 7, "PostTypeId": 5, "Body": "<p>Tag wiki.</p>"},
    ]
    inputs.write_posts_xml(str(site / "Posts.xml"), rows, raw_rows=['  <row Id="8" PostTypeId="1" Body="unclosed />'])
    docs, report = run("stackexchange", [tmp_path], tmp_path)
    assert report["dropped"] == {"bad_xml": 1, "not_question": 1, "orphan_answer": 1}
    assert docs[0]["text"] == ("How long to boil an egg?\n\nI want a soft egg & toast.\n\n"
                               "Top answer: six minutes.\ntimer 6m\n  done\n\nMiddle answer.\n\nLow answer.")
    assert docs[0]["meta"]["id"] == "cooking.stackexchange.com/1" and docs[0]["meta"]["answers"] == 3
    assert docs[1]["text"] == "Unanswered?\n\nNobody knows."
