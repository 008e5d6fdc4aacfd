"""Text extraction from HTML with the standard library's tolerant parser.

Scripts, styles, comments and the document head are removed; entities are decoded; block-level
elements become line breaks; whitespace inside `<pre>` is kept (code on StackExchange)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

_SKIPPED = {"script", "style", "noscript", "template", "head", "svg", "iframe", "object"}
_BLOCK = {
    "address", "article", "aside", "blockquote", "br", "dd", "div", "dl", "dt", "fieldset",
    "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr",
    "li", "main", "nav", "ol", "p", "pre", "section", "table", "tbody", "td", "tfoot", "th",
    "thead", "title", "tr", "ul", "body", "html",
}
_VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "wbr"}
_PRE_LINE = "\x00"
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
_MARKUP = re.compile(r"<(?:[a-zA-Z][a-zA-Z0-9]*[\s/>]|/[a-zA-Z]|!--|!doctype)", re.IGNORECASE)


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.pre_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIPPED:
            if tag not in _VOID:
                self.skip_depth += 1
            return
        if tag == "pre":
            self.pre_depth += 1
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_startendtag(self, tag, attrs):
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in _SKIPPED:
            self.skip_depth = max(0, self.skip_depth - 1)
            return
        if tag == "pre":
            self.pre_depth = max(0, self.pre_depth - 1)
        if tag in _BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip_depth:
            return
        if self.pre_depth:
            # a sentinel keeps <pre> line breaks and indentation out of the line clean-up below
            self.parts.append(_PRE_LINE + data.replace("\r\n", "\n").replace("\n", _PRE_LINE))
        else:
            self.parts.append(_SPACES.sub(" ", data.replace("\n", " ")))


def html_to_text(html: str) -> str:
    """Visible text of `html`, one block per line (empty lines removed)."""
    parser = _TextExtractor()
    parser.feed(html.replace(_PRE_LINE, ""))
    parser.close()
    out: list[str] = []
    for line in "".join(parser.parts).split("\n"):
        if _PRE_LINE in line:
            out.extend(p.rstrip() for p in line.split(_PRE_LINE) if p.strip())
        elif line.strip():
            out.append(line.strip())
    return "\n".join(out)


def looks_like_html(text: str) -> bool:
    """True when `text` holds HTML tags (cheap check run before parsing)."""
    return _MARKUP.search(text, 0, 4096) is not None
