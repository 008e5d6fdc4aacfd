"""The two things a reader yields: a document, or an input record it could not read."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Document:
    """A document on its way through the stages. `meta` ends up in the output line."""

    text: str
    meta: dict = field(default_factory=dict)
    lines_removed: int = 0  # by line dedup; a post stage re-checks length rules only when > 0


@dataclass
class Rejected:
    """An input record dropped for `reason`; `raw` is what was read (kept with --keep-rejected)."""

    reason: str
    raw: str = ""
    meta: dict = field(default_factory=dict)
