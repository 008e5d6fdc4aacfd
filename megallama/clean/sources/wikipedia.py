"""Wikipedia: MediaWiki XML dumps (`pages-articles.xml`, `.bz2` too) of the paper's 20 languages.
Each `<page>` is parsed on its own, so a broken record is counted and the rest of the dump goes on.
Wikitext becomes plain text with mwparserfromhell: links keep their label; templates, refs,
tables, comments, files and categories are removed."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from typing import IO, Iterator
from urllib.parse import quote

import mwparserfromhell
from mwparserfromhell import nodes

from megallama.clean.document import Document, Rejected
from megallama.compressed import open_binary
from megallama.clean.io import DEFAULT_MAX_RECORD_BYTES
from megallama.clean.sources.base import Source, decode_utf8

LLAMA_LANGUAGES = frozenset("bg ca cs da de en es fr hr hu it nl pl pt ro ru sl sr sv uk".split())
# namespaces whose links are not prose: 6 File, 14 Category (their localised names come from the dump)
_DROPPED_NAMESPACES = {"6": {"file", "image", "media"}, "14": {"category"}}
_DROPPED_TAGS = {"ref", "references", "table", "gallery", "math", "timeline", "score", "imagemap", "chem",
                 "graph", "mapframe", "templatedata", "syntaxhighlight", "source", "hiero", "noinclude"}
_INTERWIKI = re.compile(r"^:?[a-z]{2,3}(?:-[a-z]+)*:", re.I)
_PAGE, _END = b"<page>", b"</page>"


def iter_page_chunks(f: IO[bytes], block: int = 1 << 20,
                     max_page_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[bytes, bytes | None]]:
    """Yield (header, page bytes) for each `<page>...</page>` of a dump; a page missing its end tag
    is yielded as is (its XML parse then fails and it is counted); a page over `max_page_bytes`
    as None, its bytes skipped without being held."""
    buf, header = b"", None
    while True:
        chunk = f.read1(block)  # one read: the pages before a damaged part come out before its error
        buf += chunk
        if header is None:
            start = buf.find(_PAGE)
            if start < 0 and chunk:
                continue
            header, buf = buf[:max(start, 0)], buf[max(start, 0):]
        while True:
            start = buf.find(_PAGE)
            if start < 0:
                buf = buf[-len(_PAGE):]
                break
            end = buf.find(_END, start)
            nxt = buf.find(_PAGE, start + len(_PAGE), end if end >= 0 else len(buf))
            if nxt >= 0:  # a new page starts before this one ends: broken record
                yield header, buf[start:nxt]
                buf = buf[nxt:]
            elif end >= 0:
                yield header, buf[start:end + len(_END)] if end + len(_END) - start <= max_page_bytes else None
                buf = buf[end + len(_END):]
            else:
                if len(buf) - start > max_page_bytes:
                    yield header, None
                    buf = buf[-len(_PAGE):]  # the rest of the page holds no "<page>": skipped
                elif not chunk and start >= 0 and buf[start:].strip():
                    yield header, buf[start:]
                    buf = b""
                break
        if not chunk:
            return


def dump_language(header: bytes, path: str) -> str:
    """The wiki's language: `xml:lang` of the dump, else its `dbname`, else the file name."""
    m = re.search(rb'xml:lang="([a-zA-Z-]+)"', header)
    if m:
        return m.group(1).decode()
    m = re.search(rb"<dbname>([a-z_-]+?)wiki</dbname>", header) or re.match(rb"([a-z_-]+?)wiki", os.path.basename(path).encode())
    return m.group(1).decode().replace("_", "-") if m else "unknown"


def dropped_link_prefixes(header: bytes) -> set[str]:
    """Lower-case names of the File and Category namespaces, English and localised."""
    names = set().union(*_DROPPED_NAMESPACES.values())
    for key, name in re.findall(rb'<namespace key="(-?\d+)"[^>]*>([^<]+)</namespace>', header):
        if key.decode() in _DROPPED_NAMESPACES:
            names.add(name.decode("utf-8", "replace").lower())
    return names


def _render(code, dropped: set[str]) -> str:
    out: list[str] = []
    for node in code.nodes:
        if isinstance(node, nodes.Text):
            out.append(str(node.value))
        elif isinstance(node, nodes.Wikilink):
            title = str(node.title).strip()
            prefix = title.split(":", 1)[0].lstrip(":").lower() if ":" in title else ""
            if prefix in dropped or _INTERWIKI.match(title):
                continue
            out.append(_render(node.text, dropped) if node.text is not None else title.split("#")[0])
        elif isinstance(node, nodes.ExternalLink):
            if node.title is not None:
                out.append(_render(node.title, dropped))
        elif isinstance(node, nodes.Tag):
            tag = str(node.tag).lower()
            if tag in _DROPPED_TAGS:
                continue
            if tag == "br":
                out.append("\n")
            elif node.contents is not None:
                text = _render(node.contents, dropped)
                out.append(("\n" + text) if tag in ("li", "dt", "dd", "p", "div") else text)
        elif isinstance(node, nodes.Heading):
            out.append("\n" + _render(node.title, dropped).strip() + "\n")
        elif isinstance(node, nodes.HTMLEntity):
            out.append(node.normalize())
        # templates, template arguments and comments are dropped
    return "".join(out)


def wikitext_to_text(wikitext: str, dropped_prefixes: set[str] | None = None) -> str:
    """Plain text of a wikitext page."""
    dropped = dropped_prefixes if dropped_prefixes is not None else set().union(*_DROPPED_NAMESPACES.values())
    text = _render(mwparserfromhell.parse(wikitext), dropped)
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


class Wikipedia(Source):
    name = "wikipedia"
    extensions = (".xml", ".xml.bz2", ".xml.gz")
    input_format = "a MediaWiki XML dump (<page> elements, e.g. pages-articles.xml.bz2)"

    def __init__(self, wiki_languages: frozenset[str] = LLAMA_LANGUAGES, **options) -> None:
        super().__init__(**options)
        self.wiki_languages = wiki_languages

    def read(self, path: str) -> Iterator[Document | Rejected]:
        lang, dropped = None, None
        with open_binary(path) as f:
            for header, chunk in iter_page_chunks(f, max_page_bytes=self.max_record_bytes):
                if lang is None:
                    lang, dropped = dump_language(header, path), dropped_link_prefixes(header)
                meta = {"source": self.name, "file": os.path.basename(path)}
                if chunk is None:
                    yield Rejected("too_large", "", meta)
                    continue
                text = decode_utf8(chunk)
                if text is None:
                    yield Rejected("bad_utf8", chunk.decode("utf-8", "replace")[:2000], meta)
                    continue
                try:
                    page = ET.fromstring(chunk)
                except ET.ParseError:
                    yield Rejected("bad_xml", text[:2000], meta)
                    continue
                title = page.findtext("title") or ""
                meta.update({"id": page.findtext("id"), "title": title, "wiki_lang": lang,
                             "url": f"https://{lang}.wikipedia.org/wiki/{quote(title.replace(' ', '_'))}"})
                del meta["file"]
                if lang not in self.wiki_languages:
                    yield Rejected("language", title, meta)
                elif (page.findtext("ns") or "0") != "0":
                    yield Rejected("not_article", title, meta)
                elif page.find("redirect") is not None:
                    yield Rejected("redirect", title, meta)
                else:
                    wikitext = page.findtext("revision/text") or ""
                    try:
                        yield Document(wikitext_to_text(wikitext, dropped), meta)
                    except (RecursionError, ValueError) as e:  # pathological markup: this page only
                        yield Rejected("bad_wikitext", f"{type(e).__name__}: {e}\n{wikitext[:2000]}", meta)

    def post(self, doc: Document) -> str | None:
        if not doc.text:
            return "empty"
        self.language(doc)  # labels lang/lang_score; the dump's language decided what is kept
        return self.quality_check(doc)


SOURCE_CLASS = Wikipedia
