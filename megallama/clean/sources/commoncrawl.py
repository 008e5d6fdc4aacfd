"""CommonCrawl (CCNet-style): WET/WARC files via warcio, or JSONL (`text`/`raw_content`/`html`
with `url`). Pass 1 extracts text from HTML; then CCNet line dedup over the whole input; then
documents under 300 characters are dropped, fastText language ID keeps English at score ≥ 0.5, the
optional n-gram perplexity filter (--perplexity-model) keeps the head and middle buckets, and the
optional reference-page classifier (--quality-model) keeps pages at or above its threshold."""

from __future__ import annotations

import os
from typing import Iterator

from megallama.clean.document import Document, Rejected
from megallama.clean.html import html_to_text, looks_like_html
from megallama.compressed import open_binary
from megallama.clean.io import DEFAULT_MAX_RECORD_BYTES
from megallama.clean.sources.base import Source, decode_utf8, iter_jsonl

TEXT_FIELDS = ("text", "raw_content", "content", "html")


def _is_warc(path: str) -> bool:
    name = os.path.basename(path).lower()
    return ".warc" in name or name.endswith((".wet", ".wet.gz", ".arc.gz"))


def read_warc(path: str, source: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Document | Rejected]:
    """Documents of a WET (`conversion` records) or WARC (`response` records with HTML) file. A
    record shorter than its Content-Length is `truncated_input`, one over `max_record_bytes`
    `too_large`; a compressed file that ends early raises TruncatedInput."""
    from warcio.archiveiterator import ArchiveIterator

    # open_binary, not warcio, decompresses: warcio takes a gzip stream that ends early for the
    # end of the file, so a cut file would lose its tail without a word
    with open_binary(path, buffered=False) as f:
        for record in ArchiveIterator(f, arc2warc=True):
            if record.rec_type not in ("conversion", "response"):
                continue
            url = record.rec_headers.get_header("WARC-Target-URI") or ""
            meta = {"source": source, "url": url,
                    "warc_id": record.rec_headers.get_header("WARC-Record-ID"),
                    "date": record.rec_headers.get_header("WARC-Date")}
            raw = record.content_stream().read(max_record_bytes + 1)
            if len(raw) > max_record_bytes:
                yield Rejected("too_large", "", meta)
                continue
            if record.raw_stream.limit > 0:  # Content-Length bytes not all there
                yield Rejected("truncated_input", "", {**meta, "bytes": record.length - record.raw_stream.limit,
                                                       "content_length": record.length})
                continue
            text = decode_utf8(raw)
            if text is None:
                yield Rejected("bad_utf8", raw.decode("utf-8", "replace"), meta)
                continue
            if record.rec_type == "response":
                ctype = (record.http_headers.get_header("Content-Type") or "") if record.http_headers else ""
                if "html" not in ctype.lower():
                    yield Rejected("not_html", text[:1000], meta)
                    continue
                text = html_to_text(text)
            yield Document(text, meta)


def read_jsonl_pages(path: str, source: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[Document | Rejected]:
    """Documents from JSONL rows holding the page in one of TEXT_FIELDS."""
    for lineno, obj in iter_jsonl(path, max_record_bytes):
        if isinstance(obj, Rejected):
            obj.meta["source"] = source
            yield obj
            continue
        field = next((k for k in TEXT_FIELDS if isinstance(obj.get(k), str)), None)
        meta = {"source": source, "url": obj.get("url") or f"{os.path.basename(path)}:{lineno}"}
        if field is None:
            yield Rejected("missing_text", str(obj)[:1000], meta)
            continue
        text = obj[field]
        if field == "html" or looks_like_html(text):
            text = html_to_text(text)
        yield Document(text, meta)


class CommonCrawl(Source):
    name = "commoncrawl"
    extensions = (".wet", ".wet.gz", ".warc", ".warc.gz", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz")
    input_format = 'WET/WARC records, or JSONL with "text", "raw_content" or "html"'
    line_dedup = True
    exact_dedup = True
    languages = {"en"}
    perplexity_buckets = ("head", "middle")  # RedPajama's choice of CCNet's buckets
    min_length = 300  # CCNet's minimum document length, in characters, after line dedup

    def read(self, path: str) -> Iterator[Document | Rejected]:
        if _is_warc(path):
            return read_warc(path, self.name, self.max_record_bytes)
        return read_jsonl_pages(path, self.name, self.max_record_bytes)

    def pre(self, doc: Document) -> str | None:
        return None if doc.text.strip() else "empty"

    def post(self, doc: Document) -> str | None:
        doc.text = doc.text.strip()
        if len(doc.text) < self.min_length:
            return "too_short"
        return self.language(doc) or self.perplexity_check(doc) or self.quality_check(doc)


SOURCE_CLASS = CommonCrawl
