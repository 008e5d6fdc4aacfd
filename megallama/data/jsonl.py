"""Reading JSONL corpora (plain or compressed: ``.gz``, ``.bz2``, ``.xz``, ``.zst``), counting every
line that cannot be used; a compressed file that ends early is an error naming it (TruncatedInput).

A broken JSON line, a missing key, a non-string value, empty text or invalid UTF-8 is not an
error by default: the line is skipped and counted under its reason, so a run over terabytes is not
lost to one bad line, and the summary says what was dropped. ``strict`` turns the first skip into
an error naming the file and line.
"""
from __future__ import annotations

import glob
import json
import os
from collections import Counter
from typing import Iterator, Sequence

from megallama.compressed import open_binary
from megallama.fileio import unique_paths


class BadLineError(ValueError):
    """A line that cannot be used, in strict mode."""


def expand_inputs(patterns: Sequence[str], flag: str = "--input") -> list[str]:
    """Files named by ``patterns`` (paths or globs: a quoted glob outgrows no argument limit), in
    order, each once (``a.jsonl`` and ``./a.jsonl`` too); error naming ``flag`` if one matches nothing."""
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"{flag} {pattern!r} matches no file")
        paths.extend(matches)
    return unique_paths(paths)


def iter_line_batches(paths: Sequence[str], batch_lines: int = 512, batch_bytes: int = 4 << 20
                      ) -> Iterator[tuple[str, int, list[bytes]]]:
    """(path, number of the batch's first line, raw lines): bounded batches, streamed."""
    for path in paths:
        with open_binary(path) as stream:
            batch: list[bytes] = []
            nbytes, first = 0, 1
            for lineno, line in enumerate(stream, 1):
                if not batch:
                    first = lineno
                batch.append(line)
                nbytes += len(line)
                if len(batch) >= batch_lines or nbytes >= batch_bytes:
                    yield path, first, batch
                    batch, nbytes = [], 0
            if batch:
                yield path, first, batch


def parse_lines(lines: list[bytes], json_keys: Sequence[str], path: str, first_line: int, strict: bool
                ) -> tuple[dict[str, list[str]], Counter, list[int]]:
    """Texts per key for the usable lines, skip counts by reason, and the usable lines' numbers."""
    texts: dict[str, list[str]] = {k: [] for k in json_keys}
    skipped: Counter = Counter()
    kept: list[int] = []
    for offset, raw in enumerate(lines):
        reason = None
        if not raw.strip():
            reason = "blank line"
        else:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                reason = "invalid UTF-8"
            else:
                try:
                    record = json.loads(line)
                except ValueError:
                    reason = "broken JSON"
                else:
                    if not isinstance(record, dict):
                        reason = "not a JSON object"
                    else:
                        for key in json_keys:
                            value = record.get(key)
                            if value is None:
                                reason = f"missing key {key!r}"
                            elif not isinstance(value, str):
                                reason = f"key {key!r} is not a string"
                            elif not value:
                                reason = f"empty {key!r}"
                            elif (b"\\ud" in raw or b"\\uD" in raw) and not _encodes(value):
                                reason = "invalid UTF-8"  # a lone surrogate escape such as \ud800
                            if reason:
                                break
        if reason:
            if strict:
                raise BadLineError(f"{path}:{first_line + offset}: {reason}")
            skipped[reason] += 1
            continue
        for key in json_keys:
            texts[key].append(record[key])
        kept.append(first_line + offset)
    return texts, skipped, kept


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def iter_texts(paths: Sequence[str], json_keys: Sequence[str] = ("text",), strict: bool = False,
               skipped: Counter | None = None) -> Iterator[str]:
    """Every usable text (all ``json_keys`` of a line, in order); skips are added to ``skipped``."""
    for path, first, lines in iter_line_batches(paths):
        texts, bad, _ = parse_lines(lines, json_keys, path, first, strict)
        if skipped is not None:
            skipped.update(bad)
        for row in zip(*(texts[k] for k in json_keys)):
            yield from row


def format_skips(skipped: Counter) -> str:
    if not skipped:
        return "none skipped"
    return ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
