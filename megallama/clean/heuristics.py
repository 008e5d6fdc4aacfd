"""Rule-based quality filters: C4's page heuristics (Raffel et al. 2020, `c4_utils`) and the code
heuristics used for GitHub (max/mean line length, alphanumeric share)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", "\u201d")
POLICY_PHRASES = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
# a sentence ends at . ! or ? (possibly closed by quotes/brackets) followed by a space or line end
SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")


def count_sentences(text: str) -> int:
    """Number of sentence ends in `text` (a line that ends in terminal punctuation has at least one)."""
    return len(SENTENCE_END.findall(text))


@dataclass
class C4Config:
    """C4's defaults; `bad_words` (lower-case words) is optional as in the paper's description."""

    min_words_per_line: int = 3
    min_sentences: int = 5
    max_word_length: int = 1000
    remove_citations: bool = True
    bad_words: frozenset[str] = field(default_factory=frozenset)


def c4_filter(text: str, config: C4Config = C4Config()) -> tuple[str, str | None]:
    """Apply C4's line and page rules. Returns `(kept_text, None)` or `("", reason)`.

    Lines are kept only if they end in terminal punctuation (not an ellipsis), have at least
    `min_words_per_line` words, no word over `max_word_length` characters, and mention neither
    "javascript" nor a cookie/policy phrase. Pages with "lorem ipsum" or a curly brace, fewer than
    `min_sentences` sentences, or a bad word are dropped."""
    kept: list[str] = []
    for raw in text.split("\n"):
        line = raw.strip()
        if not line:
            continue
        words = line.split()
        if len(words) < config.min_words_per_line:
            continue
        if len(line) > config.max_word_length and any(len(w) > config.max_word_length for w in words):
            continue
        if config.remove_citations and "[" in line:
            line = _CITATION.sub("", line)
        if not line.endswith(TERMINAL_PUNCTUATION) or line.endswith("..."):
            continue
        lower = line.lower()
        if "lorem ipsum" in lower:
            return "", "lorem_ipsum"
        if "javascript" in lower:  # checked before the brace, as C4 does: such a line is only skipped
            continue
        if "{" in line:
            return "", "curly_brace"
        if ("cookie" in lower or "terms of use" in lower or "privacy policy" in lower) and any(
                p in lower for p in POLICY_PHRASES):  # all but two of the phrases mention cookies
            continue
        kept.append(line)
    out = "\n".join(kept)
    if count_sentences(out) < config.min_sentences:  # sentences never span lines: count once
        return "", "too_few_sentences"
    if config.bad_words and not config.bad_words.isdisjoint(re.findall(r"\w+", out.lower())):
        return "", "bad_words"
    return out, None


@dataclass
class CodeConfig:
    """The public LLaMA reproduction's thresholds for GitHub files."""

    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alphanumeric_share: float = 0.25


def code_filter(content: str, config: CodeConfig = CodeConfig()) -> str | None:
    """Reason to drop a source file, or None to keep it."""
    if not content.strip():
        return "empty"
    lines = content.split("\n")
    lengths = [len(line) for line in lines]
    if max(lengths) > config.max_line_length:
        return "long_line"
    if sum(lengths) / len(lengths) > config.max_mean_line_length:
        return "long_mean_line"
    alnum = sum(c.isalnum() for c in content)
    if alnum / len(content) < config.min_alphanumeric_share:
        return "low_alphanumeric"
    return None
