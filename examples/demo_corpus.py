"""A small multi-source raw corpus from real text already on any machine with Python and this
project's dependencies, shaped like the LLaMA mixture's raw downloads (for `examples/demo.py`; `bench/perplexity.py` scores
its pages):

* github — source files of installed packages and of the standard library as BigQuery
  `github_repos` rows (`repo_name`, `path`, `license`, `content`). The licence is the one each
  package declares in its metadata (first SPDX term, lower-cased like BigQuery's keys); the standard
  library is `psf-2.0`, which the paper's Apache/BSD/MIT filter drops.
* c4 — the language reference shipped in `pydoc_data.topics`, one JSONL row per topic, and the
  packages' descriptions (their PyPI project pages, as stored in their metadata).
* commoncrawl — WET files (the format CommonCrawl distributes) whose pages are the docstrings of
  each standard-library module (English) and the translations of gettext catalogues found in
  site-packages and the system's locale folder (mostly not English, so the language filter drops
  them).

Nothing is downloaded or generated: the same installation gives the same files.
"""

from __future__ import annotations

import ast
import gettext
import glob
import hashlib
import io
import importlib.metadata
import os
import re
import sys
import sysconfig
import textwrap
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from megallama.clean.io import dumps_line
from megallama.fileio import atomic_open

# Packages this project installs (requirements-dev.txt, and datatrove's humanize), so every machine running the demo
# has them (one that is missing is skipped).
DISTRIBUTIONS = ("transformers", "torch", "numpy", "datatrove", "tensorboard", "megatron-core",
                 "warcio", "datasketch", "sentencepiece", "safetensors", "zstandard", "matplotlib",
                 "tqdm", "humanize", "fasttext-numpy2", "mwparserfromhell", "orjson", "pybind11", "pytest")
STDLIB_SKIP = {"site-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo",
               "ensurepip", "__pycache__", "dist-packages"}
SYSTEM_LOCALE_DIRS = ("/usr/share/locale", "/usr/local/share/locale")
# GitHub-visible text files; binaries are never exported (BigQuery marks them `binary`).
TEXT_SUFFIXES = (".py", ".pyi", ".md", ".rst", ".txt", ".cfg", ".toml", ".json", ".yaml", ".yml",
                 ".sh", ".c", ".h", ".cpp", ".cu", ".js", ".css", ".html")
# Trove classifiers to BigQuery-style licence keys; unknown ones stay "other" (and are dropped).
_CLASSIFIER_KEYS = {"MIT License": "mit", "Apache Software License": "apache-2.0", "BSD License": "bsd",
                    "Python Software Foundation License": "psf-2.0",
                    "Mozilla Public License 2.0 (MPL 2.0)": "mpl-2.0"}
_FREE_TEXT_KEYS = {"apache 2.0": "apache-2.0", "apache 2.0 license": "apache-2.0",
                   "apache license 2.0": "apache-2.0", "mit license": "mit", "bsd": "bsd"}
_SPDX_TERM = re.compile(r"[A-Za-z0-9.\-+]+")


@dataclass
class CorpusSizes:
    """How much of each kind of text to take; `full` for the demo, `quick` for its test."""

    bytes_per_package: int        # source bytes per installed package (github)
    stdlib_bytes: int             # standard-library source bytes (github, dropped by licence)
    max_file_bytes: int           # larger files are left out (generated tables, vendored code)
    pydoc_topics: int             # reference topics (c4); 0 = all
    docstring_bytes: int          # standard-library docstring pages (commoncrawl)
    catalogues: int               # gettext catalogues (commoncrawl)
    catalogue_bytes: int          # translated text taken from one catalogue
    shards: int                   # files per source (the cleaning tool's unit of work)
    distributions: tuple[str, ...] = DISTRIBUTIONS

    @classmethod
    def full(cls) -> "CorpusSizes":
        return cls(bytes_per_package=40_000, stdlib_bytes=160_000, max_file_bytes=48_000,
                   pydoc_topics=0, docstring_bytes=900_000, catalogues=80, catalogue_bytes=16_000,
                   shards=4)

    @classmethod
    def quick(cls) -> "CorpusSizes":
        return cls(bytes_per_package=12_000, stdlib_bytes=12_000, max_file_bytes=12_000,
                   pydoc_topics=16, docstring_bytes=60_000, catalogues=12, catalogue_bytes=4_000,
                   shards=2, distributions=("transformers", "warcio", "datasketch", "matplotlib"))


@dataclass
class SourceFiles:
    """One source's raw files and what went into them."""

    source: str
    paths: list[str]
    documents: int = 0
    bytes: int = 0
    origins: dict[str, int] = field(default_factory=dict)  # where the documents came from
    skipped: dict[str, int] = field(default_factory=dict)  # candidates not exported, by reason


# -- github ------------------------------------------------------------------------------------
def licence_key(metadata) -> str:
    """BigQuery-style licence key of a package: the first SPDX term of License-Expression, else a
    short License field, else the first licence classifier; "other" when none says."""
    expression = metadata.get("License-Expression")
    if expression:
        return _SPDX_TERM.search(expression).group(0).lower()
    free = (metadata.get("License") or "").strip()
    if free and "\n" not in free and len(free) <= 40:
        first = re.split(r"\s+(?:AND|OR|WITH)\s+", free)[0].strip().lower()
        return _FREE_TEXT_KEYS.get(first, first.replace(" ", "-"))
    for classifier in metadata.get_all("Classifier") or []:
        if classifier.startswith("License ::"):
            key = _CLASSIFIER_KEYS.get(classifier.rsplit("::", 1)[1].strip())
            if key:
                return key
    return "other"


def repo_name(metadata, fallback: str) -> str:
    """`owner/name` of the package's GitHub repository as its metadata gives it, else `fallback`."""
    urls = [metadata.get("Home-page") or ""] + [u.split(",", 1)[-1] for u in metadata.get_all("Project-URL") or []]
    for url in urls:
        m = re.search(r"github\.com/([\w.-]+)/([\w.-]+)", url)
        if m:
            return f"{m.group(1)}/{m.group(2).removesuffix('.git')}"
    return fallback


def _read_text(path: str, skipped: dict[str, int]) -> str | None:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        skipped["not_utf8"] = skipped.get("not_utf8", 0) + 1
    except OSError:
        skipped["unreadable"] = skipped.get("unreadable", 0) + 1
    return None


def _take_files(candidates: Iterable[tuple[str, str]], budget: int, max_file_bytes: int,
                skipped: dict[str, int]) -> Iterator[tuple[str, str]]:
    """(repository path, text) of text files in the given order until `budget` bytes are taken."""
    taken = 0
    for rel, path in candidates:
        if taken >= budget:
            return
        if not rel.endswith(TEXT_SUFFIXES):
            continue
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        if size < 0:
            skipped["missing"] = skipped.get("missing", 0) + 1
            continue
        if size > max_file_bytes:
            skipped["too_large_for_demo"] = skipped.get("too_large_for_demo", 0) + 1
            continue
        text = _read_text(path, skipped)
        if text is not None:
            taken += size
            yield rel, text


def package_rows(name: str, sizes: CorpusSizes, skipped: dict[str, int]) -> Iterator[dict]:
    """BigQuery rows for the installed files of distribution `name` (none if not installed)."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        skipped["package_not_installed"] = skipped.get("package_not_installed", 0) + 1
        return
    licence, repo = licence_key(dist.metadata), repo_name(dist.metadata, name)
    files = sorted((str(f), str(dist.locate_file(f))) for f in dist.files or []
                   if ".dist-info" not in str(f) and "__pycache__" not in str(f))
    for rel, text in _take_files(files, sizes.bytes_per_package, sizes.max_file_bytes, skipped):
        yield {"repo_name": repo, "path": rel, "license": licence, "content": text}


def stdlib_files() -> list[tuple[str, str]]:
    """(path as in CPython's repository, file) for the installed standard library, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP and not d.startswith("config-"))
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                out.append(("Lib/" + os.path.relpath(path, root).replace(os.sep, "/"), path))
    return out


def stdlib_rows(sizes: CorpusSizes, skipped: dict[str, int]) -> Iterator[dict]:
    """The standard library as it is on GitHub (python/cpython) under its own licence, PSF-2.0."""
    for rel, text in _take_files(stdlib_files(), sizes.stdlib_bytes, sizes.max_file_bytes, skipped):
        yield {"repo_name": "python/cpython", "path": rel, "license": "psf-2.0", "content": text}


# -- c4 ----------------------------------------------------------------------------------------
def pydoc_topic_rows(limit: int = 0) -> Iterator[dict]:
    """One C4-shaped row per topic of the language reference in `pydoc_data.topics`."""
    from pydoc_data.topics import topics

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for i, name in enumerate(sorted(topics)):
        if limit and i >= limit:
            return
        yield {"text": topics[name], "url": f"pydoc_data.topics/{version}#{name}"}


def reference_instructions(limit: int = 0) -> Iterator[dict]:
    """Alpaca-format questions and answers from the language reference (the finetuning demo): per
    topic, "Explain TITLE." → its first prose paragraph, and "Show the syntax of TITLE." → its
    first indented block (grammar or example), when it has one."""
    from pydoc_data.topics import topics

    for i, name in enumerate(sorted(topics)):
        if limit and i >= limit:
            return
        lines = topics[name].splitlines()
        title = lines[0].strip() if lines else name
        title = "the" + title[3:] if title.startswith("The ") else title
        paragraphs = re.split(r"\n\s*\n", "\n".join(lines[2:]))
        prose = [p for p in paragraphs if p.strip() and not p.startswith(" ") and not set(p.strip()) <= set("*=-")]
        code = [p for p in paragraphs if p.strip() and p.startswith("   ")]
        if prose:
            yield {"instruction": f"Explain {title} in Python.", "output": " ".join(prose[0].split())}
        if code:
            yield {"instruction": f"Show the syntax of {title}.", "output": textwrap.dedent(code[0]).strip()}


def package_description_rows(names: Iterable[str]) -> Iterator[dict]:
    """One C4-shaped row per installed package with a description: its PyPI project page text."""
    for name in names:
        try:
            metadata = importlib.metadata.metadata(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        text = metadata.get_payload() or metadata.get("Description") or ""
        if text.strip():
            yield {"text": text, "url": f"https://pypi.org/project/{metadata['Name']}/{metadata['Version']}/"}


# -- commoncrawl -------------------------------------------------------------------------------
def module_docstrings(source: str) -> list[str]:
    """Docstrings of a module, its classes and functions, in source order."""
    tree = ast.parse(source)
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def docstring_pages(budget: int, skipped: dict[str, int]) -> Iterator[dict]:
    """One page per standard-library module: all its docstrings, blank-line separated."""
    taken = 0
    for rel, path in stdlib_files():
        if taken >= budget:
            return
        text = _read_text(path, skipped)
        if text is None:
            continue
        try:
            docs = module_docstrings(text)
        except SyntaxError:
            skipped["unparsable_python"] = skipped.get("unparsable_python", 0) + 1
            continue
        if docs:
            page = "\n\n".join(docs)
            taken += len(page.encode("utf-8"))
            yield {"text": page, "url": f"python-stdlib:{rel}"}


def gettext_catalogues(count: int, locale_dirs: Iterable[str] = ()) -> list[str]:
    """`count` compiled gettext catalogues (.mo), spread evenly over the sorted list of those that
    packages in site-packages ship (PACKAGE/locale/LANG/LC_MESSAGES/) and those in `locale_dirs`
    (default: the system's locale folders, where present)."""
    paths = sysconfig.get_paths()
    patterns = [os.path.join(root, *["*"] * depth, "locale", "*", "LC_MESSAGES", "*.mo")
                for root in dict.fromkeys((paths["purelib"], paths["platlib"])) for depth in (1, 2)]
    patterns += [os.path.join(root, "*", "LC_MESSAGES", "*.mo") for root in (locale_dirs or SYSTEM_LOCALE_DIRS)]
    found = sorted({path for pattern in patterns for path in glob.glob(pattern)})
    if count <= 0 or not found:
        return []
    step = max(1, len(found) // count)
    return found[::step][:count]


def catalogue_page(path: str, max_bytes: int) -> dict | None:
    """The translated strings of one catalogue as a page (None when it has none)."""
    with open(path, "rb") as f:
        catalogue = gettext.GNUTranslations(f)
    # GNUTranslations has no public iterator over messages; _catalog is its parsed table.
    messages = sorted({v.strip() for k, v in catalogue._catalog.items() if k and isinstance(v, str) and v.strip()})
    text = "\n".join(messages).encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
    return {"text": text, "url": "gettext:" + path} if text else None


def write_wet(path: str, pages: Iterable[dict]) -> int:
    """Write pages as a gzipped WET file of `conversion` records; returns the number written.
    Record ids and dates are derived from the page, so the same pages give the same file."""
    from warcio.warcwriter import WARCWriter

    n = 0
    with atomic_open(path, "wb") as f:
        writer = WARCWriter(f, gzip=True)
        for page in pages:
            body = page["text"].encode("utf-8")
            record_id = uuid.uuid5(uuid.NAMESPACE_URL, page["url"] + hashlib.sha1(body).hexdigest())
            headers = {"WARC-Record-ID": f"<urn:uuid:{record_id}>", "WARC-Date": "2023-02-27T00:00:00Z",
                       "Content-Type": "text/plain"}
            record = writer.create_warc_record(page["url"], "conversion", payload=io.BytesIO(body),
                                               length=len(body), warc_headers_dict=headers)
            writer.write_record(record)
            n += 1
    return n


def write_jsonl(path: str, rows: Iterable[dict]) -> int:
    """Write rows as JSONL atomically; returns the number written."""
    n = 0
    with atomic_open(path, "wb") as f:
        for row in rows:
            f.write(dumps_line(row))
            n += 1
    return n


# -- assembly ----------------------------------------------------------------------------------
def _split(items: list, shards: int) -> list[list]:
    shards = max(1, min(shards, len(items)))
    return [items[i::shards] for i in range(shards)]


def _text_bytes(row: dict) -> int:
    return len((row.get("content") or row.get("text") or "").encode("utf-8"))


def assemble_corpus(out_dir: str, sizes: CorpusSizes, locale_dirs: Iterable[str] = ()) -> dict[str, SourceFiles]:
    """Write the raw corpus under `out_dir/{github,c4,commoncrawl}/` and say what is in it."""
    result = {}

    skipped: dict[str, int] = {}
    rows, origins = [], {}
    for name in sizes.distributions:
        got = list(package_rows(name, sizes, skipped))
        if got:
            origins[got[0]["repo_name"] + f" ({got[0]['license']})"] = len(got)
        rows += got
    std = list(stdlib_rows(sizes, skipped))
    origins["python/cpython (psf-2.0)"] = len(std)
    rows += std
    result["github"] = _write_source(out_dir, "github", rows, sizes.shards, origins, skipped, ".jsonl")

    topics = list(pydoc_topic_rows(sizes.pydoc_topics))
    descriptions = list(package_description_rows(sizes.distributions))
    result["c4"] = _write_source(out_dir, "c4", topics + descriptions, sizes.shards,
                                 {"pydoc_data.topics": len(topics), "package descriptions": len(descriptions)},
                                 {}, ".json")

    skipped = {}
    pages = list(docstring_pages(sizes.docstring_bytes, skipped))
    origins = {"standard-library docstrings": len(pages)}
    catalogue_pages = [p for p in (catalogue_page(c, sizes.catalogue_bytes)
                                   for c in gettext_catalogues(sizes.catalogues, locale_dirs)) if p]
    origins["gettext catalogues"] = len(catalogue_pages)
    result["commoncrawl"] = _write_source(out_dir, "commoncrawl", pages + catalogue_pages, sizes.shards,
                                          origins, skipped, ".warc.wet.gz")
    return result


def _write_source(out_dir: str, source: str, rows: list[dict], shards: int, origins: dict,
                  skipped: dict, suffix: str) -> SourceFiles:
    if not rows:
        raise RuntimeError(f"no {source} documents found on this machine for the demo corpus")
    folder = os.path.join(out_dir, source)
    files = SourceFiles(source, [], origins=origins, skipped=skipped)
    parts = _split(rows, shards)
    for i, part in enumerate(parts):
        path = os.path.join(folder, f"{source}-{i:05d}-of-{len(parts):05d}{suffix}")
        files.documents += write_wet(path, part) if suffix.endswith(".wet.gz") else write_jsonl(path, part)
        files.bytes += sum(_text_bytes(r) for r in part)
        files.paths.append(path)
    return files
