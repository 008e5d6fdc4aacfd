"""The demo's embedded corpus: licence keys, the per-source readers' views of the files it writes,
gettext catalogues against gettext's own lookups, determinism."""

import email.message
import gettext
import glob
import importlib.metadata
import importlib.util
import json
import os
import sys

import pytest

from megallama.clean.sources.c4 import C4
from megallama.clean.sources.commoncrawl import read_warc
from megallama.clean.sources.github import GitHub, licence_allowed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from demo_corpus import (  # noqa: E402  (examples/demo_corpus.py)
    CorpusSizes,
    assemble_corpus,
    catalogue_page,
    gettext_catalogues,
    licence_key,
    module_docstrings,
    repo_name,
    write_wet,
)


def metadata(**fields):
    m = email.message.Message()
    for key, values in fields.items():
        for value in values if isinstance(values, list) else [values]:
            m[key.replace("_", "-")] = value
    return m


@pytest.mark.parametrize("fields, key", [
    ({"License_Expression": "MPL-2.0 AND MIT"}, "mpl-2.0"),
    ({"License_Expression": "Apache-2.0 AND BSD-3-Clause", "License": "ignored"}, "apache-2.0"),
    ({"License": "Apache 2.0"}, "apache-2.0"),
    ({"License": "MIT"}, "mit"),
    ({"License": "BSD-3-Clause OR MIT"}, "bsd-3-clause"),
    # a whole licence text in the License field: the classifier decides
    ({"License": "License agreement for matplotlib\n1. This LICENSE AGREEMENT ...",
      "Classifier": ["Programming Language :: Python", "License :: OSI Approved :: Python Software Foundation License"]},
     "psf-2.0"),
    ({"Classifier": "License :: OSI Approved :: MIT License"}, "mit"),
    ({"Classifier": "License :: Other/Proprietary License"}, "other"),
    ({}, "other"),
])
def test_licence_key(fields, key):
    assert licence_key(metadata(**fields)) == key


def test_licence_keys_meet_the_github_filter_as_their_licences_do():
    assert licence_allowed(licence_key(metadata(License="MIT")))
    assert licence_allowed(licence_key(metadata(License_Expression="Apache-2.0")))
    assert licence_allowed(licence_key(metadata(Classifier="License :: OSI Approved :: BSD License")))
    assert not licence_allowed(licence_key(metadata(License_Expression="MPL-2.0 AND MIT")))
    assert not licence_allowed("psf-2.0")
    assert not licence_allowed(licence_key(metadata()))


def test_repo_name():
    assert repo_name(metadata(Home_page="https://github.com/webrecorder/warcio"), "x") == "webrecorder/warcio"
    assert repo_name(metadata(Project_URL=["Docs, https://x.readthedocs.io",
                                           "Source, https://github.com/a-b/c.d.git"]), "x") == "a-b/c.d"
    assert repo_name(metadata(Home_page="https://example.org"), "fallback") == "fallback"


def test_module_docstrings_in_source_order():
    source = '''"""Module."""
class A:
    """Class A."""
    def f(self):
        """Method f."""
def g():
    pass
async def h():
    """Coroutine h."""
'''
    assert module_docstrings(source) == ["Module.", "Class A.", "Method f.", "Coroutine h."]


def test_catalogue_page_holds_the_translations_gettext_gives():
    # humanize is installed with datatrove (requirements-dev.txt) and ships compiled catalogues
    paths = sorted(glob.glob(os.path.join(os.path.dirname(importlib.util.find_spec("humanize").origin),
                                          "locale", "de_DE", "LC_MESSAGES", "*.mo")))
    assert paths, "humanize's de_DE catalogue not found"
    with open(paths[0], "rb") as f:
        translations = gettext.GNUTranslations(f)
    page = catalogue_page(paths[0], max_bytes=1 << 20)
    lines = set(page["text"].split("\n"))
    assert page["url"] == "gettext:" + paths[0]
    for msgid in ("%d hour", "%d day", "%s ago"):
        assert translations.gettext(msgid) != msgid and translations.gettext(msgid) in lines
    assert "%d hour" not in lines  # translations only, not the English message ids
    assert len(catalogue_page(paths[0], max_bytes=20)["text"].encode()) <= 20


def test_gettext_catalogues_spread_and_bounded(tmp_path):
    for lang in ("de", "fr", "ja", "ru"):
        folder = tmp_path / lang / "LC_MESSAGES"
        folder.mkdir(parents=True)
        (folder / "demo.mo").write_bytes(b"")
    everything = gettext_catalogues(10_000, [str(tmp_path)])
    ours = [p for p in everything if p.startswith(str(tmp_path))]
    assert ours == sorted(ours) and len(ours) == 4
    assert len(gettext_catalogues(3, [str(tmp_path)])) == 3
    assert gettext_catalogues(0, [str(tmp_path)]) == []


def test_wet_files_read_back_by_the_commoncrawl_reader(tmp_path):
    pages = [{"text": "Première page.\nSecond line.", "url": "gettext:/a.mo"},
             {"text": "Another page " * 50, "url": "python-stdlib:Lib/x.py"}]
    a, b = tmp_path / "a.warc.wet.gz", tmp_path / "b.warc.wet.gz"
    assert write_wet(str(a), pages) == 2
    write_wet(str(b), pages)
    assert a.read_bytes() == b.read_bytes()  # ids and dates come from the pages
    docs = list(read_warc(str(a), "commoncrawl"))
    assert [(d.text, d.meta["url"]) for d in docs] == [(p["text"], p["url"]) for p in pages]


@pytest.fixture(scope="module")
def quick_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return out, assemble_corpus(str(out), CorpusSizes.quick())


def test_assemble_corpus_files_as_the_cleaners_read_them(quick_corpus):
    out, files = quick_corpus
    assert set(files) == {"github", "c4", "commoncrawl"}
    for source, f in files.items():
        assert f.paths and all(p.startswith(str(out / source)) for p in f.paths)
        assert f.documents == sum(f.origins.values())
        assert f.bytes > 0
    github = GitHub()
    rows = [doc for p in files["github"].paths for doc in github.read(p)]
    assert len(rows) == files["github"].documents
    licences = {d.meta["license"] for d in rows}
    assert "psf-2.0" in licences and any(licence_allowed(k) for k in licences)
    assert any(d.meta["id"].startswith("python/cpython/Lib/") for d in rows)
    c4 = [doc for p in files["c4"].paths for doc in C4().read(p)]
    assert len(c4) == files["c4"].documents
    assert any(d.meta["url"].startswith("pydoc_data.topics/") for d in c4)
    assert any(d.meta["url"].startswith("https://pypi.org/project/") for d in c4)
    cc = [doc for p in files["commoncrawl"].paths for doc in read_warc(p, "commoncrawl")]
    assert len(cc) == files["commoncrawl"].documents
    assert any(d.meta["url"].startswith("python-stdlib:") for d in cc)
    assert any(d.meta["url"].startswith("gettext:") for d in cc)


def test_assemble_corpus_is_deterministic(quick_corpus, tmp_path):
    out, files = quick_corpus
    again = assemble_corpus(str(tmp_path), CorpusSizes.quick())
    for source, f in files.items():
        assert [os.path.relpath(p, out) for p in f.paths] == [os.path.relpath(p, tmp_path) for p in again[source].paths]
        for p, q in zip(f.paths, again[source].paths):
            with open(p, "rb") as x, open(q, "rb") as y:
                assert x.read() == y.read()


def test_github_rows_keep_the_installed_file_text(quick_corpus):
    _, files = quick_corpus
    with open(files["github"].paths[0], encoding="utf-8") as f:
        row = json.loads(f.readline())
    if row["repo_name"] == "python/cpython":
        import sysconfig
        path = os.path.join(sysconfig.get_paths()["stdlib"], row["path"].removeprefix("Lib/"))
    else:
        dist = next(d for d in importlib.metadata.distributions()
                    if any(str(p) == row["path"] for p in d.files or []))
        path = str(dist.locate_file(row["path"]))
    with open(path, encoding="utf-8") as f:
        assert f.read() == row["content"]
