"""What every source cleaner provides to the runner, and the readers several of them share."""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

from megallama.clean.document import Document, Rejected
from megallama.compressed import open_binary
from megallama.fileio import unique_paths
from megallama.clean.io import DEFAULT_MAX_RECORD_BYTES, JSONDecodeError, iter_lines, loads
from megallama.clean.langid import LanguageIdentifier
from megallama.clean.perplexity import PerplexityFilter
from megallama.clean.quality import QualityClassifier


class Source:
    """A source cleaner. The runner calls, per shard: `read` (input records to documents or
    rejections), `pre` on each document (stages that need no cross-document state), then the
    global dedups the class enables, then `post`. `pre`/`post` edit the document in place and
    return a drop reason, or None to keep it."""

    name = ""
    extensions: tuple[str, ...] = ()  # input files picked up when an input path is a folder
    input_format = ""  # what a shard holds, named when a non-empty one gives no document
    exact_dedup = False
    line_dedup = False
    near_dedup_threshold: float | None = None
    languages: set[str] | None = None  # language-ID filter (None: label only)
    lang_threshold = 0.5
    label_language = True
    perplexity_buckets: tuple[str, ...] | None = None  # kept by default with --perplexity-model (None: no such stage)

    def __init__(self, quality_model: str | None = None, quality_threshold: float = 0.5,
                 lid_model: str | None = None, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                 perplexity_model: str | None = None, perplexity_buckets: Sequence[str] | str | None = None,
                 perplexity_cutoffs: Sequence[float] | str | None = None) -> None:
        if max_record_bytes < 1:
            raise ValueError(f"max_record_bytes must be positive, got {max_record_bytes}")
        if not 0.0 <= quality_threshold <= 1.0:
            raise ValueError(f"quality threshold must be within [0, 1], got {quality_threshold}")
        self.max_record_bytes = max_record_bytes
        self.quality = QualityClassifier(quality_model, quality_threshold) if quality_model else None
        self.lid = LanguageIdentifier(self.languages, self.lang_threshold, lid_model) if self.label_language else None
        self.perplexity = None
        if perplexity_model is not None:
            if self.perplexity_buckets is None:
                raise ValueError(f"the n-gram perplexity filter is for web pages (commoncrawl, c4), not {self.name}")
            self.perplexity = PerplexityFilter(perplexity_model, perplexity_buckets or self.perplexity_buckets,
                                               perplexity_cutoffs)
        elif perplexity_buckets is not None or perplexity_cutoffs is not None:
            raise ValueError("perplexity buckets and cut-offs need a perplexity model (--perplexity-model)")

    def warm_up(self) -> None:
        """Load models now, so that workers forked afterwards share them."""
        for stage in (self.lid, self.quality):
            if stage is not None:
                stage.model
        if self.perplexity is not None:
            self.perplexity.scorer.load()

    @property
    def global_dedup(self) -> bool:
        return self.exact_dedup or self.line_dedup or self.near_dedup_threshold is not None

    def settings(self) -> dict:
        """What determines the output besides the inputs (recorded to refuse mixing runs)."""
        return {"source": self.name, "quality_model": os.path.abspath(self.quality.model_path) if self.quality else None,
                "quality_threshold": self.quality.threshold if self.quality else None,
                "languages": sorted(self.languages) if self.languages else None,
                "lang_threshold": self.lang_threshold, "max_record_bytes": self.max_record_bytes,
                **(self.perplexity.settings() if self.perplexity else {})}

    def shards(self, inputs: Iterable[str]) -> list[str]:
        """Input files, one shard each: files as given, folders searched for `extensions`; a file
        named twice (e.g. by itself and by its folder) is one shard, not its documents twice."""
        out: list[str] = []
        for path in inputs:
            if os.path.isdir(path):
                found = []
                for root, dirs, files in os.walk(path):
                    dirs[:] = [d for d in dirs if not d.startswith(".")]  # e.g. a cleaner's .clean state
                    found += [os.path.join(root, f) for f in files if f.endswith(self.extensions) and not f.startswith(".")]
                out.extend(sorted(found))
            elif os.path.isfile(path):
                out.append(path)
            else:
                raise FileNotFoundError(f"input not found: {path}")
        return unique_paths(out)

    def read(self, path: str) -> Iterator[Document | Rejected]:
        raise NotImplementedError

    def pre(self, doc: Document) -> str | None:
        return None

    def post(self, doc: Document) -> str | None:
        return None

    def dedup_key(self, doc: Document) -> str:
        """The content compared by exact dedup."""
        return doc.text

    # shared stages ------------------------------------------------------------------------
    def language(self, doc: Document) -> str | None:
        """Label `lang`/`lang_score`; drop if a language filter is set and not met."""
        lang, score = self.lid.predict(doc.text)
        doc.meta["lang"], doc.meta["lang_score"] = lang, round(score, 4)
        if self.languages is not None and not self.lid.keep(lang, score):
            return "language"
        return None

    def perplexity_check(self, doc: Document) -> str | None:
        """With an n-gram model: label `perplexity`/`bucket`; drop buckets not kept."""
        return None if self.perplexity is None else self.perplexity(doc.meta, doc.text)

    def quality_check(self, doc: Document) -> str | None:
        """With a quality model: keep pages scoring at least its threshold."""
        if self.quality is None:
            return None
        keep, score = self.quality.keep(doc.text)
        doc.meta["quality_score"] = round(score, 4)
        return None if keep else "low_quality"


def decode_utf8(raw: bytes) -> str | None:
    """Strict UTF-8 decoding; None for bad bytes (counted by the caller, never guessed)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def iter_jsonl(path: str, max_line_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[int, dict | Rejected]]:
    """(line number, parsed object or Rejected) for each non-empty line; a bad line never stops
    the file, a line over `max_line_bytes` is skipped as `too_large`."""
    with open_binary(path) as f:
        for lineno, raw in enumerate(iter_lines(f, max_line_bytes), 1):
            where = {"file": os.path.basename(path), "line": lineno}
            if raw is None:
                yield lineno, Rejected("too_large", "", where)
                continue
            if not raw.strip():
                continue
            if decode_utf8(raw) is None:
                yield lineno, Rejected("bad_utf8", raw.decode("utf-8", "replace"), where)
                continue
            try:
                obj = loads(raw)
            except JSONDecodeError:
                yield lineno, Rejected("bad_json", raw.decode("utf-8"), where)
                continue
            if not isinstance(obj, dict):
                yield lineno, Rejected("bad_json", raw.decode("utf-8"), where)
                continue
            yield lineno, obj
