"""Books: Project Gutenberg (and Books3-style) plain-text files, one book per file. The Gutenberg
licence header and footer are removed; a book whose content overlaps more than 90% with a book
kept before it (MinHash LSH estimate of the Jaccard similarity of word 5-grams) is dropped."""

from __future__ import annotations

import os
import re
from typing import Iterator

from megallama.clean.document import Document, Rejected
from megallama.compressed import open_binary, strip_compression
from megallama.clean.io import RecordTooLarge, read_capped
from megallama.clean.sources.base import Source, decode_utf8

_START = re.compile(
    r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT).*$"
    r"|^\*END\*THE SMALL PRINT!.*$"
    r"|^\*{3}\s*START OF THE PROJECT GUTENBERG.*$", re.I | re.M)
_END = re.compile(
    r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT).*$"
    r"|^End of (?:the )?Project Gutenberg'?s? .*$"
    r"|^\*{3}\s*END OF THE PROJECT GUTENBERG.*$", re.I | re.M)
_TITLE = re.compile(r"^Title:\s*(.+)$", re.M)


def strip_gutenberg_boilerplate(text: str) -> str:
    """The book between Gutenberg's START and END markers (the whole text when they are absent)."""
    text = text.replace("\r\n", "\n")
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip()


class Books(Source):
    name = "books"
    extensions = (".txt", ".txt.gz", ".txt.bz2", ".txt.zst")
    input_format = "plain-text books, one per file"
    near_dedup_threshold = 0.9

    def read(self, path: str) -> Iterator[Document | Rejected]:
        book_id = strip_compression(os.path.basename(path))[: -len(".txt")] if path.endswith(self.extensions) else os.path.basename(path)
        meta = {"source": self.name, "id": book_id}
        with open_binary(path) as f:
            try:
                raw = read_capped(f, self.max_record_bytes, f"book {book_id}")
            except RecordTooLarge:
                yield Rejected("too_large", "", meta)
                return
        text = decode_utf8(raw.removeprefix(b"\xef\xbb\xbf"))
        if text is None:
            yield Rejected("bad_utf8", raw.decode("utf-8", "replace")[:2000], meta)
            return
        title = _TITLE.search(text[:10000])
        if title:
            meta["title"] = title.group(1).strip()
        yield Document(text, meta)

    def pre(self, doc: Document) -> str | None:
        doc.text = strip_gutenberg_boilerplate(doc.text)
        return None if doc.text else "empty"

    def post(self, doc: Document) -> str | None:
        self.language(doc)
        return self.quality_check(doc)


SOURCE_CLASS = Books
