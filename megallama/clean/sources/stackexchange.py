"""StackExchange: a site's `Posts.xml` from the data dump. Each question becomes one document —
title and body, then its answers sorted by score, highest first — with the HTML removed. Rows are
parsed one by one, so a broken row is counted and the rest of the file goes on."""

from __future__ import annotations

import os
import sqlite3
import tempfile
import xml.etree.ElementTree as ET
from typing import Iterator

from megallama.clean.document import Document, Rejected
from megallama.clean.html import html_to_text
from megallama.compressed import open_binary
from megallama.clean.io import iter_lines
from megallama.clean.sources.base import Source, decode_utf8

QUESTION, ANSWER = "1", "2"


def site_name(path: str) -> str:
    """The site a Posts.xml belongs to: its folder's name (e.g. `stats.stackexchange.com`)."""
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return folder or "stackexchange"


def _int(row: dict, key: str) -> int:
    try:
        return int(row.get(key, 0))
    except ValueError:
        return 0


class StackExchange(Source):
    name = "stackexchange"
    extensions = ("Posts.xml", "Posts.xml.gz", "Posts.xml.bz2", "Posts.xml.zst")
    input_format = "a data dump's Posts.xml (<row> elements)"

    def read(self, path: str) -> Iterator[Document | Rejected]:
        site = site_name(path)
        # posts go to a temporary SQLite table, so a site as large as stackoverflow.com (tens of
        # millions of posts) is grouped on disk, not in memory
        with tempfile.TemporaryDirectory(prefix="stackexchange-") as tmp:
            db = sqlite3.connect(os.path.join(tmp, "posts.db"))
            try:
                db.execute("CREATE TABLE question (id TEXT, score INTEGER, title TEXT, body TEXT)")
                db.execute("CREATE TABLE answer (parent TEXT, id INTEGER, score INTEGER, body TEXT)")
                yield from self._load(path, site, db)
                db.execute("CREATE INDEX answer_parent ON answer (parent, score DESC, id)")
                db.execute("CREATE INDEX question_id ON question (id)")
                for qid, score, title, body in db.execute("SELECT id, score, title, body FROM question ORDER BY rowid"):
                    answers = [b for (b,) in db.execute(
                        "SELECT body FROM answer WHERE parent = ? ORDER BY score DESC, id", (qid,))]
                    parts = [title, html_to_text(body)] + [html_to_text(b) for b in answers]
                    meta = {"source": self.name, "id": f"{site}/{qid}", "url": f"https://{site}/questions/{qid}",
                            "answers": len(answers), "score": score}
                    yield Document("\n\n".join(p for p in parts if p.strip()), meta)
                for aid, body in db.execute("SELECT a.id, a.body FROM answer a WHERE NOT EXISTS "
                                            "(SELECT 1 FROM question q WHERE q.id = a.parent) ORDER BY a.rowid"):
                    yield Rejected("orphan_answer", body, {"source": self.name, "id": f"{site}/{aid}"})
            finally:
                db.close()

    def _load(self, path: str, site: str, db: sqlite3.Connection) -> Iterator[Rejected]:
        """Store the questions and answers of Posts.xml; yield the rows that are neither or broken."""
        with open_binary(path) as f:
            for lineno, raw in enumerate(iter_lines(f, self.max_record_bytes), 1):
                where = {"source": self.name, "site": site, "line": lineno}
                if raw is None:
                    yield Rejected("too_large", "", where)
                    continue
                line = raw.strip()
                if not line.startswith(b"<row"):
                    continue
                text = decode_utf8(line)
                if text is None:
                    yield Rejected("bad_utf8", line.decode("utf-8", "replace"), where)
                    continue
                try:
                    row = ET.fromstring(text).attrib
                except ET.ParseError:
                    yield Rejected("bad_xml", text, where)
                    continue
                kind = row.get("PostTypeId")
                if kind == QUESTION and row.get("Id"):
                    db.execute("INSERT INTO question VALUES (?, ?, ?, ?)",
                               (row["Id"], _int(row, "Score"), row.get("Title", ""), row.get("Body", "")))
                elif kind == ANSWER and row.get("ParentId"):
                    db.execute("INSERT INTO answer VALUES (?, ?, ?, ?)",
                               (row["ParentId"], _int(row, "Id"), _int(row, "Score"), row.get("Body", "")))
                else:
                    yield Rejected("not_question", text, where)

    def post(self, doc: Document) -> str | None:
        if not doc.text.strip():
            return "empty"
        self.language(doc)
        return self.quality_check(doc)


SOURCE_CLASS = StackExchange
