"""C4: JSONL (`text`, `url`, `timestamp`; .json.gz as distributed). C4's page heuristics first
(pass 1), then exact and CCNet line dedup over the whole input, then the sentence minimum again
(line dedup can shorten a page) and fastText language ID (English, score ≥ 0.5)."""

from __future__ import annotations

import os
from typing import Iterator

from megallama.clean.document import Document, Rejected
from megallama.clean.heuristics import C4Config, c4_filter, count_sentences
from megallama.clean.perplexity import BUCKETS
from megallama.clean.sources.base import Source, iter_jsonl


class C4(Source):
    name = "c4"
    extensions = (".json", ".json.gz", ".jsonl", ".jsonl.gz", ".jsonl.zst")
    input_format = 'JSONL with "text" and "url"'
    exact_dedup = True
    line_dedup = True
    languages = {"en"}
    perplexity_buckets = BUCKETS  # C4 used heuristics: with a model, pages are labelled, none dropped by default

    def __init__(self, c4_config: C4Config | None = None, **options) -> None:
        super().__init__(**options)
        self.c4_config = c4_config or C4Config()

    def read(self, path: str) -> Iterator[Document | Rejected]:
        for lineno, obj in iter_jsonl(path, self.max_record_bytes):
            if isinstance(obj, Rejected):
                obj.meta["source"] = self.name
                yield obj
                continue
            meta = {"source": self.name, "url": obj.get("url") or f"{os.path.basename(path)}:{lineno}"}
            if obj.get("timestamp"):
                meta["timestamp"] = obj["timestamp"]
            if not isinstance(obj.get("text"), str):
                yield Rejected("missing_text", str(obj)[:1000], meta)
                continue
            yield Document(obj["text"], meta)

    def pre(self, doc: Document) -> str | None:
        text, reason = c4_filter(doc.text, self.c4_config)
        if reason is None:  # a dropped page keeps its text, for --keep-rejected
            doc.text = text
        return reason

    def post(self, doc: Document) -> str | None:
        if doc.lines_removed and count_sentences(doc.text) < self.c4_config.min_sentences:
            return "too_few_sentences"
        return self.language(doc) or self.perplexity_check(doc) or self.quality_check(doc)


SOURCE_CLASS = C4
