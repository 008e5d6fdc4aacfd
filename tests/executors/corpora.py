"""Small multi-shard inputs for each of the seven sources, with duplicates (exact, line-level and
near) spread across shards, so that the cross-shard dedup decides something in every source."""

from __future__ import annotations

import random
from pathlib import Path

from megallama.clean.sources import SOURCES
from tests.clean import inputs
from tests.clean.samples import SENTENCES, page, paragraph

TEX = ("\\documentclass{article}\n\\newcommand{\\R}{\\mathbb{R}}\n\\begin{document}\n\\section{Intro} %% note\n"
       "Let $x \\in \\R$ be %s.\n\\section{More}\n%s\n\\end{document}\n")


def _web_rows(rng: random.Random, shard: int, made: list[str], docs: int) -> list[dict]:
    shared = [f"Shared navigation line number {i} for every page on this site." for i in range(4)]
    rows = []
    for d in range(docs):
        r = rng.random()
        if r < 0.2 and made:
            text = rng.choice(made)
        elif r < 0.3:
            text = page(rng, rng.choice(["de", "fr"]))
        else:
            lines = page(rng).split("\n") + rng.sample(shared, 2)
            rng.shuffle(lines)
            text = "\n".join(lines)
            made.append(text)
        rows.append({"url": f"http://s{shard}/{d}", "text": text})
    return rows


def write_source_inputs(source: str, folder: Path, shards: int = 3, docs: int = 8, seed: int = 0) -> list[str]:
    """Input files of `source` in `folder` (created), one per shard; returns their paths."""
    assert source in SOURCES
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths: list[str] = []
    if source in ("commoncrawl", "c4"):
        made: list[str] = []
        for s in range(shards):
            path = str(folder / (f"part-{s}.jsonl" if source == "commoncrawl" else f"c4-train.{s:05d}-of-01024.json"))
            inputs.write_jsonl(path, _web_rows(rng, s, made, docs), raw_lines={2: b"{broken"})
            paths.append(path)
    elif source == "github":
        bodies = [f"def f{i}(a, b):\n    return a * {i} + b\n\n\nprint(f{i}(1, 2))\n" for i in range(docs)]
        for s in range(shards):
            rows = [{"repo_name": f"r{s}/x{d}", "path": f"m{d}.py", "license": rng.choice(["mit", "apache-2.0", "gpl-3.0"]),
                     "content": "# Copyright (c) 2020 Someone\n# Licensed under the MIT License.\n\n" + rng.choice(bodies)}
                    for d in range(docs)]
            path = str(folder / f"github-{s}.jsonl")
            inputs.write_jsonl(path, rows)
            paths.append(path)
    elif source == "wikipedia":
        for s in range(shards):
            pages = [inputs.wiki_page(s * 100 + d, f"Page {s}-{d}", paragraph(rng, rng.choice(["en", "en", "de"]), 4))
                     for d in range(docs)]
            pages.append(inputs.wiki_page(s * 100 + 99, f"Redirect {s}", "", redirect=f"Page {s}-0"))
            path = str(folder / f"enwiki-{s}.xml")
            inputs.write_wiki_dump(path, pages)
            paths.append(path)
    elif source == "books":
        vocab = sorted({w for ss in SENTENCES["en"] for w in ss.split()})
        books = [" ".join(rng.choices(vocab, k=1500)) for _ in range(shards + 1)]
        for s in range(shards):
            # odd shards: book 0 with a few words changed (a near duplicate of shard 0)
            text = books[s] if s % 2 == 0 else " ".join(w if i % 300 else "changed" for i, w in enumerate(books[0].split()))
            path = folder / f"{10 + s}.txt"
            path.write_text(text, encoding="utf-8")
            paths.append(str(path))
        (folder / f"{10 + shards}.txt").write_text(books[0], encoding="utf-8")  # an exact copy, near-dup too
        paths.append(str(folder / f"{10 + shards}.txt"))
    elif source == "arxiv":
        for s in range(shards):
            path = folder / f"2301.{s:05d}.tex"
            path.write_text(TEX % (f"paper {s}", paragraph(rng, "en", 3)))
            paths.append(str(path))
    elif source == "stackexchange":
        for s in range(shards):
            site = folder / f"site{s}.stackexchange.com"
            site.mkdir(exist_ok=True)
            rows = []
            for q in range(docs):
                rows.append({"Id": q * 10, "PostTypeId": 1, "Score": q, "Title": f"Question {q}?",
                             "Body": f"<p>{paragraph(rng, 'en', 2)}</p>"})
                rows += [{"Id": q * 10 + a, "PostTypeId": 2, "ParentId": q * 10, "Score": rng.randint(0, 9),
                          "Body": f"<p>Answer {a}.</p>"} for a in range(1, 3)]
            inputs.write_posts_xml(str(site / "Posts.xml"), rows)
            paths.append(str(site / "Posts.xml"))
    return paths
