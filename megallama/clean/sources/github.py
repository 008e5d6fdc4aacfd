"""GitHub: JSONL rows shaped like the BigQuery `github_repos` export (`repo_name`, `path`,
`license`, `content`). Apache, BSD and MIT licences only; a whitelist of source extensions;
licence/copyright header comments removed; files with a line over 1000 characters, a mean line
over 100, or under 25% alphanumeric characters dropped; exact file dedup across repositories."""

from __future__ import annotations

import os
import re
from typing import Iterator

from megallama.clean.document import Document, Rejected
from megallama.clean.heuristics import CodeConfig, code_filter
from megallama.clean.sources.base import Source, iter_jsonl

EXTENSIONS = {
    ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp", ".hh": "cpp",
    ".cs": "csharp", ".java": "java", ".kt": "kotlin", ".scala": "scala", ".go": "go", ".rs": "rust",
    ".swift": "swift", ".m": "objective-c", ".js": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".php": "php", ".py": "python", ".rb": "ruby",
    ".pl": "perl", ".pm": "perl", ".lua": "lua", ".r": "r", ".jl": "julia", ".hs": "haskell",
    ".ml": "ocaml", ".ex": "elixir", ".erl": "erlang", ".clj": "clojure", ".sh": "shell",
    ".bash": "shell", ".sql": "sql", ".f90": "fortran", ".f": "fortran", ".vhdl": "vhdl",
    ".v": "verilog", ".dart": "dart", ".groovy": "groovy", ".html": "html", ".css": "css",
    ".scss": "css", ".tex": "tex", ".md": "markdown", ".rst": "restructuredtext", ".cmake": "cmake",
    ".mk": "makefile", ".proto": "protobuf", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml",
}
HASH_COMMENT = {"python", "ruby", "perl", "r", "julia", "shell", "cmake", "makefile", "toml", "yaml", "elixir"}
DASH_COMMENT = {"sql", "lua", "haskell", "vhdl"}
_LICENSE_WORDS = re.compile(r"copyright|licen[cs]e|spdx|all rights reserved|permission is hereby granted|\(c\)", re.I)
_BLOCKS = {
    "slash": re.compile(r"\s*(?:/\*.*?\*/|(?://[^\n]*(?:\n|$))+)", re.S),
    "hash": re.compile(r"\s*(?:#(?!!)[^\n]*(?:\n|$))+"),
    "dash": re.compile(r"\s*(?:--[^\n]*(?:\n|$))+|\s*\{-.*?-\}", re.S),
    "xml": re.compile(r"\s*<!--.*?-->", re.S),
    "python_doc": re.compile(r'\s*(?:"""|\'\'\').*?(?:"""|\'\'\')', re.S),
}


def licence_allowed(licence: str | None) -> bool:
    """Apache, BSD or MIT (BigQuery's `licenses` names: mit, apache-2.0, bsd-3-clause, ...)."""
    name = (licence or "").lower()
    return name.startswith(("mit", "apache", "bsd", "0bsd"))


def remove_licence_header(content: str, language: str) -> str:
    """Strip leading comment blocks that mention a licence or copyright (keeps a `#!` line)."""
    shebang = ""
    if content.startswith("#!"):
        shebang, _, content = content.partition("\n")
        shebang += "\n"
    kinds = ["slash", "xml"]
    if language in HASH_COMMENT:
        kinds = ["hash"] + (["python_doc"] if language == "python" else [])
    elif language in DASH_COMMENT:
        kinds = ["dash"]
    elif language in ("html", "markdown"):
        kinds = ["xml"]
    changed = True
    while changed:
        changed = False
        for kind in kinds:
            m = _BLOCKS[kind].match(content)
            if m and m.group(0).strip() and _LICENSE_WORDS.search(m.group(0)):
                content = content[m.end():]
                changed = True
    return shebang + content.lstrip("\n")


class GitHub(Source):
    name = "github"
    extensions = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".jsonl.zst")
    input_format = "JSONL rows of the BigQuery github_repos export (repo_name, path, license, content)"
    exact_dedup = True
    label_language = False

    def __init__(self, code_config: CodeConfig | None = None, **options) -> None:
        super().__init__(**options)
        self.code_config = code_config or CodeConfig()

    def read(self, path: str) -> Iterator[Document | Rejected]:
        for lineno, obj in iter_jsonl(path, self.max_record_bytes):
            if isinstance(obj, Rejected):
                obj.meta["source"] = self.name
                yield obj
                continue
            repo, fpath = obj.get("repo_name") or "", obj.get("path") or ""
            meta = {"source": self.name, "id": f"{repo}/{fpath}" if repo else f"{os.path.basename(path)}:{lineno}",
                    "license": obj.get("license")}
            if not isinstance(obj.get("content"), str):
                yield Rejected("missing_text", str(obj)[:1000], meta)
                continue
            yield Document(obj["content"], meta)

    def pre(self, doc: Document) -> str | None:
        if not licence_allowed(doc.meta.get("license")):
            return "license"
        ext = os.path.splitext(doc.meta["id"].lower())[1]
        if ext not in EXTENSIONS:
            return "extension"
        doc.meta["language"] = EXTENSIONS[ext]
        doc.meta["lang"], doc.meta["lang_score"] = None, None
        doc.text = remove_licence_header(doc.text, EXTENSIONS[ext])
        return code_filter(doc.text, self.code_config) or self.quality_check(doc)


SOURCE_CLASS = GitHub
