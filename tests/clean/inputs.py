"""Builders of small input files in the formats people download (for the source tests)."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import tarfile
from xml.sax.saxutils import escape, quoteattr


def write_wet(path: str, pages: list[tuple[str, str | bytes]]) -> None:
    """A gzipped WET file (conversion records) written with warcio; bytes pages are written as is."""
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url, text in pages:
            record = writer.create_warc_record(url, "conversion", payload=io.BytesIO(text if isinstance(text, bytes) else text.encode("utf-8")),
                                               warc_headers_dict={"Content-Type": "text/plain"})
            writer.write_record(record)


def write_warc_html(path: str, pages: list[tuple[str, str]]) -> None:
    """A gzipped WARC file with HTML `response` records."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url, html in pages:
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(html.encode("utf-8")),
                                                          http_headers=headers))


def write_jsonl(path: str, rows: list, raw_lines: dict[int, bytes] | None = None) -> None:
    """JSONL rows; `raw_lines` inserts raw (e.g. broken) lines before the given row indices."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        for i, row in enumerate(rows):
            if raw_lines and i in raw_lines:
                f.write(raw_lines[i] + b"\n")
            f.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")


def wiki_page(page_id: int, title: str, wikitext: str, ns: int = 0, redirect: str | None = None) -> str:
    redirect_tag = f'<redirect title={quoteattr(redirect)} />' if redirect else ""
    return (f"  <page>\n    <title>{escape(title)}</title>\n    <ns>{ns}</ns>\n    <id>{page_id}</id>\n"
            f"    {redirect_tag}\n    <revision>\n      <id>{page_id * 10}</id>\n"
            f"      <text bytes=\"{len(wikitext)}\" xml:space=\"preserve\">{escape(wikitext)}</text>\n"
            f"    </revision>\n  </page>\n")


def write_wiki_dump(path: str, pages: list[str], lang: str = "en", category: str = "Category") -> None:
    """A MediaWiki export (plain or .bz2) with the given <page> strings."""
    head = (f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="{lang}">\n'
            f"  <siteinfo>\n    <sitename>Wikipedia</sitename>\n    <dbname>{lang}wiki</dbname>\n"
            f'    <namespaces>\n      <namespace key="0" case="first-letter" />\n'
            f'      <namespace key="6" case="first-letter">File</namespace>\n'
            f'      <namespace key="14" case="first-letter">{category}</namespace>\n    </namespaces>\n'
            f"  </siteinfo>\n")
    data = (head + "".join(pages) + "</mediawiki>\n").encode("utf-8")
    with (bz2.open if path.endswith(".bz2") else open)(path, "wb") as f:
        f.write(data)


def write_posts_xml(path: str, rows: list[dict], raw_rows: list[str] = ()) -> None:
    """A StackExchange Posts.xml; `raw_rows` are appended as given (e.g. broken rows)."""
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<posts>"]
    lines += ["  <row " + " ".join(f"{k}={quoteattr(str(v))}" for k, v in row.items()) + " />" for row in rows]
    lines += list(raw_rows) + ["</posts>"]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(files: dict[str, bytes], compression: str = "") -> bytes:
    """Bytes of a tar archive (`compression` "gz" for .tar.gz) holding `files`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:" + compression) as tar:
        for name, data in files.items():
            add_to_tar(tar, name, data)
    return buf.getvalue()
