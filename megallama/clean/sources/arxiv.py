"""ArXiv: LaTeX sources as `.tex` files, paper folders, or source tarballs (one paper's `.tar.gz`,
or arXiv's bulk `.tar` of per-paper `.gz` members). Comments, everything before the first
section, and the bibliography are removed; user macros from `\\newcommand`/`\\renewcommand`/
`\\providecommand`/`\\def` are expanded inline — with arguments and optional defaults too."""

from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
import zlib
from typing import Iterator

from megallama.clean.document import Document, Rejected
from megallama.compressed import TruncatedInput
from megallama.clean.io import RecordTooLarge, read_capped
from megallama.clean.sources.base import Source, decode_utf8
from megallama.fileio import unique_paths

_COMMENT = re.compile(r"(?<!\\)%[^\n]*")
_COMMENT_ENV = re.compile(r"\\begin\{comment\}.*?\\end\{comment\}", re.S)
_DEFINITION = re.compile(r"\\(?:(?:re)?newcommand|providecommand)\*?|\\def(?![a-zA-Z@])")
_SECTION = re.compile(r"\\(?:part|chapter|section|subsection|subsubsection|paragraph)\*?\s*[\[{]")
_BIBLIOGRAPHY = re.compile(r"\\begin\{thebibliography\}|\\bibliography\{|\\printbibliography")
_NAME = re.compile(r"\\([a-zA-Z@]+|.)")
_PARAM = re.compile(r"#(\d)")
MAX_EXPANSION_ROUNDS = 10
ARCHIVE_ERRORS = (OSError, EOFError, zlib.error, tarfile.TarError, RecordTooLarge)


def _archive_error_reason(error: Exception) -> str:
    """The drop reason of a paper whose archive could not be read."""
    if isinstance(error, RecordTooLarge):
        return "too_large"
    if isinstance(error, (EOFError, TruncatedInput)):  # a compressed stream or a member that ends early
        return "truncated_input"
    return "bad_archive"


def _group(s: str, i: int, open_: str = "{", close: str = "}") -> tuple[str, int] | None:
    """Content of the balanced group opening at s[i], and the index after it."""
    if i >= len(s) or s[i] != open_:
        return None
    depth = 0
    for j in range(i, len(s)):
        c = s[j]
        if c == "\\":
            continue
        if c == open_ and (j == 0 or s[j - 1] != "\\"):
            depth += 1
        elif c == close and s[j - 1] != "\\":
            depth -= 1
            if depth == 0:
                return s[i + 1:j], j + 1
    return None


def _skip_space(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\n":
        i += 1
    return i


def _parse_definition(s: str, m: re.Match) -> tuple[str, tuple[int, str | None, str], int] | None:
    """(name, (number of arguments, default of an optional first one, body), end) of the
    definition starting at match `m`; None if it cannot be parsed."""
    i = _skip_space(s, m.end())
    if m.group(0) == "\\def":
        name = _NAME.match(s, i)
        if not name:
            return None
        j = s.find("{", name.end())
        params = s[name.end():j] if j >= 0 else ""
        if j < 0 or not re.fullmatch(r"(?:#\d)*", params.strip()):
            return None  # delimited parameters are not expanded
        body = _group(s, j)
        return (name.group(1), (len(params.strip()) // 2, None, body[0]), body[1]) if body else None
    braced = _group(s, i)
    if braced:
        name, i = braced[0].strip(), braced[1]
    else:
        name_m = _NAME.match(s, i)
        if not name_m:
            return None
        name, i = name_m.group(0), name_m.end()
    if not name.startswith("\\"):
        return None
    nargs, default = 0, None
    i = _skip_space(s, i)
    opt = _group(s, i, "[", "]")
    if opt:
        nargs, i = int(opt[0].strip() or 0), _skip_space(s, opt[1])
        opt = _group(s, i, "[", "]")
        if opt:
            default, i = opt[0], _skip_space(s, opt[1])
    body = _group(s, i)
    return (name[1:], (nargs, default, body[0]), body[1]) if body else None


def extract_macros(tex: str) -> tuple[dict[str, tuple[int, str | None, str]], str]:
    """User macro definitions of `tex`, and `tex` with the definitions removed."""
    macros, out, pos = {}, [], 0
    for m in _DEFINITION.finditer(tex):
        if m.start() < pos:
            continue
        parsed = _parse_definition(tex, m)
        if parsed is None:
            continue
        name, macro, end = parsed
        macros[name] = macro
        out.append(tex[pos:m.start()])
        pos = end
    out.append(tex[pos:])
    return macros, "".join(out)


def _argument(s: str, i: int) -> tuple[str, int] | None:
    i = _skip_space(s, i)
    if i >= len(s):
        return None
    group = _group(s, i)
    if group:
        return group
    token = _NAME.match(s, i)
    return (token.group(0), token.end()) if token else (s[i], i + 1)


def expand_macros(tex: str, macros: dict[str, tuple[int, str | None, str]]) -> str:
    """Replace each use of a macro by its body with the arguments substituted, repeatedly
    (macros using macros), at most MAX_EXPANSION_ROUNDS times (recursive definitions)."""
    if not macros:
        return tex
    use = re.compile(r"\\(" + "|".join(re.escape(n) for n in sorted(macros, key=len, reverse=True)) + r")(?![a-zA-Z@])")
    for _ in range(MAX_EXPANSION_ROUNDS):
        out, pos, changed = [], 0, False
        for m in use.finditer(tex):
            if m.start() < pos:
                continue
            nargs, default, body = macros[m.group(1)]
            args, i = [], m.end()
            if default is not None:
                j = _skip_space(tex, i)
                opt = _group(tex, j, "[", "]")
                args.append(opt[0] if opt else default)
                i = opt[1] if opt else i
            while len(args) < nargs:
                arg = _argument(tex, i)
                if arg is None:
                    break
                args.append(arg[0])
                i = arg[1]
            if len(args) < nargs:
                continue
            out.append(tex[pos:m.start()])
            out.append(_PARAM.sub(lambda p: args[int(p.group(1)) - 1] if 0 < int(p.group(1)) <= len(args) else "", body))
            pos, changed = i, True
        out.append(tex[pos:])
        tex = "".join(out)
        if not changed:
            break
    return tex


def clean_latex(tex: str) -> tuple[str, str | None]:
    """The paper's arXiv cleaning. Returns (text, None) or ("", reason)."""
    tex = _COMMENT.sub("", _COMMENT_ENV.sub("", tex.replace("\r\n", "\n")))
    macros, tex = extract_macros(tex)
    first = _SECTION.search(tex)
    if first is None:
        return "", "no_section"
    tex = tex[first.start():]
    bib = _BIBLIOGRAPHY.search(tex)
    if bib:
        tex = tex[:bib.start()]
    tex = expand_macros(tex, macros)
    tex = "\n".join(line.rstrip() for line in tex.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", tex).strip(), None


def _join_tex(files: list[tuple[str, str]]) -> str:
    """The paper's .tex files in one text, the main file (with \\documentclass) first."""
    files = sorted(files, key=lambda f: ("\\documentclass" not in f[1], f[0]))
    return "\n".join(text for _, text in files)


def _is_main_file(path: str) -> bool:
    with open(path, "rb") as f:
        return b"\\documentclass" in f.read(1 << 16)


class ArXiv(Source):
    name = "arxiv"
    extensions = (".tex", ".tar", ".tar.gz", ".tgz")
    input_format = "LaTeX sources (.tex, or a .tar/.tar.gz of them)"

    def shards(self, inputs):
        """A folder directly holding a main file (one with `\\documentclass`) is one paper; other
        folders are searched for paper folders, `.tex` files and tarballs."""
        out = []
        for path in inputs:
            if os.path.isdir(path):
                entries = [os.path.join(path, e) for e in sorted(os.listdir(path)) if not e.startswith(".")]
                if any(e.endswith(".tex") and _is_main_file(e) for e in entries):
                    out.append(path)
                else:
                    out.extend(self.shards([e for e in entries if os.path.isdir(e) or e.endswith(self.extensions)]))
            elif os.path.isfile(path):
                out.append(path)
            else:
                raise FileNotFoundError(f"input not found: {path}")
        return unique_paths(out)

    def _paper(self, paper_id: str, files: list[tuple[str, bytes]]) -> Document | Rejected:
        meta = {"source": self.name, "id": paper_id}
        decoded = [(name, decode_utf8(raw)) for name, raw in files]
        if any(text is None for _, text in decoded):
            return Rejected("bad_utf8", "", meta)
        if not decoded:
            return Rejected("no_tex", "", meta)
        return Document(_join_tex(decoded), meta)

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
        """A member's bytes, capped at max_record_bytes."""
        try:
            with tar.extractfile(member) as f:
                return read_capped(f, self.max_record_bytes, f"archive member {member.name}")
        except tarfile.ReadError as e:  # raised by a member's read only when its data runs out
            raise TruncatedInput(f"archive member {member.name} is cut short") from e

    def _tar_papers(self, tar: tarfile.TarFile, default_id: str) -> Iterator[Document | Rejected]:
        members, damage = [], None
        try:  # the members before a damaged part of the archive are still read
            members = [m for m in tar if m.isfile()]
        except ARCHIVE_ERRORS as e:
            members, damage = [m for m in tar.members if m.isfile()], e
        last = None
        if damage is None or not any(m.name.endswith(".tex") for m in members):
            for last in self._papers_of(tar, members, default_id):  # a bulk tar: the papers before the damage
                yield last
        already_counted = isinstance(last, Rejected) and last.reason == "truncated_input"  # the cut member
        if damage is not None and not already_counted:  # (one paper's damaged tarball is dropped whole)
            yield Rejected(_archive_error_reason(damage), "", {"source": self.name, "id": default_id,
                                                               "after": members[-1].name if members else None})

    def _papers_of(self, tar: tarfile.TarFile, members: list[tarfile.TarInfo],
                   default_id: str) -> Iterator[Document | Rejected]:
        tex = [m for m in members if m.name.endswith(".tex")]
        if tex:  # one paper's source tarball
            yield self._paper(default_id, [(m.name, self._member(tar, m)) for m in tex])
            return
        for m in members:  # arXiv bulk tar: one gzip per paper (a tarball or a single .tex)
            paper_id = os.path.basename(m.name).removesuffix(".gz")
            if not m.name.endswith(".gz"):
                yield Rejected("no_tex", "", {"source": self.name, "id": paper_id})
                continue
            try:
                # decompressed through the cap: a small member can inflate to gigabytes
                with gzip.GzipFile(fileobj=io.BytesIO(self._member(tar, m))) as gz:
                    data = read_capped(gz, self.max_record_bytes, f"paper {paper_id}")
                if data[257:262] == b"ustar":
                    with tarfile.open(fileobj=io.BytesIO(data)) as inner:
                        yield from self._tar_papers(inner, paper_id)
                else:
                    yield self._paper(paper_id, [(paper_id + ".tex", data)])
            except ARCHIVE_ERRORS as e:
                yield Rejected(_archive_error_reason(e), "", {"source": self.name, "id": paper_id})

    def read(self, path: str) -> Iterator[Document | Rejected]:
        base = os.path.basename(path.rstrip("/"))
        if os.path.isdir(path):
            files = [(os.path.join(root, f), open(os.path.join(root, f), "rb").read())
                     for root, _, names in sorted(os.walk(path)) for f in sorted(names) if f.endswith(".tex")]
            yield self._paper(base, files)
        elif path.endswith(".tex"):
            with open(path, "rb") as f:
                yield self._paper(base.removesuffix(".tex"), [(path, f.read())])
        else:
            paper_id = re.sub(r"\.(tar\.gz|tgz|tar)$", "", base)
            try:
                with tarfile.open(path) as tar:
                    yield from self._tar_papers(tar, paper_id)
            except ARCHIVE_ERRORS as e:
                yield Rejected(_archive_error_reason(e), "", {"source": self.name, "id": paper_id})

    def pre(self, doc: Document) -> str | None:
        text, reason = clean_latex(doc.text)
        if reason is None:  # a dropped paper keeps its source, for --keep-rejected
            doc.text = text
        return reason or (None if doc.text else "empty")

    def post(self, doc: Document) -> str | None:
        self.language(doc)
        return self.quality_check(doc)


SOURCE_CLASS = ArXiv
