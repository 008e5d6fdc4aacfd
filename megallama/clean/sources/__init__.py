"""One cleaner per source of the LLaMA mixture; `make_source(name, ...)` builds one by name."""

from __future__ import annotations

import importlib

from megallama.clean.sources.base import Source

SOURCES = ("commoncrawl", "c4", "github", "wikipedia", "books", "arxiv", "stackexchange")


def make_source(name: str, **options) -> Source:
    """The cleaner for `name` (one of SOURCES), built with `options` (e.g. quality_model)."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")
    module = importlib.import_module(f"megallama.clean.sources.{name}")
    return module.SOURCE_CLASS(**options)
