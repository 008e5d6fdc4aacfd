"""StackExchange: a site's `Posts.xml` from the data dump. Each question becomes one document —
title and body, then its answers sorted by score, highest first — with the HTML removed. Rows are
parsed one by one, so a broken row is counted and the rest of the file goes on."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Iterator

from megallama.clean.document import Document, Rejected
from megallama.clean.html import html_to_text
from megallama.clean.io import open_binary
from megallama.clean.sources.base import Source, decode_utf8

QUESTION, ANSWER = "1", "2"


def site_name(path: str) -> str:
    """The site a Posts.xml belongs to: its folder's name (e.g. `stats.stackexchange.com`)."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return folder or "stackexchange"


def _score(row: dict) -> int:
    try:
        return int(row.get("Score", 0))
    except ValueError:
        return 0


class StackExchange(Source):
    name = "stackexchange"
    extensions = ("Posts.xml", "Posts.xml.gz", "Posts.xml.bz2", "Posts.xml.zst")

    def read(self, path: str) -> Iterator[Document | Rejected]:
        site = site_name(path)
        questions: dict[str, dict] = {}
        answers: dict[str, list[dict]] = {}
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.strip()
                if not line.startswith(b"<row"):
                    continue
                where = {"source": self.name, "site": site, "line": lineno}
                text = decode_utf8(line)
                if text is None:
                    yield Rejected("bad_utf8", line.decode("utf-8", "replace"), where)
                    continue
                try:
                    row = dict(ET.fromstring(text).attrib)
                except ET.ParseError:
                    yield Rejected("bad_xml", text, where)
                    continue
                kind = row.get("PostTypeId")
                if kind == QUESTION and row.get("Id"):
                    questions[row["Id"]] = row
                elif kind == ANSWER and row.get("ParentId"):
                    answers.setdefault(row["ParentId"], []).append(row)
                else:
                    yield Rejected("not_question", text, where)
        for qid, q in questions.items():
            thread = sorted(answers.pop(qid, []), key=lambda a: (-_score(a), int(a.get("Id", "0") or 0)))
            parts = [q.get("Title", ""), html_to_text(q.get("Body", ""))]
            parts += [html_to_text(a.get("Body", "")) for a in thread]
            meta = {"source": self.name, "id": f"{site}/{qid}", "url": f"https://{site}/questions/{qid}",
                    "answers": len(thread), "score": _score(q)}
            yield Document("\n\n".join(p for p in parts if p.strip()), meta)
        for parent, orphans in answers.items():
            for a in orphans:
                yield Rejected("orphan_answer", a.get("Body", ""), {"source": self.name, "id": f"{site}/{a.get('Id')}"})

    def post(self, doc: Document) -> str | None:
        if not doc.text.strip():
            return "empty"
        self.language(doc)
        return self.quality_check(doc)


SOURCE_CLASS = StackExchange
