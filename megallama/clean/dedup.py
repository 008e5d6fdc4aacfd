"""Deduplication: CCNet line dedup, exact document dedup, MinHash-LSH near dedup.

Every dedup here is defined on a deterministic global order (shard index, then position in the
shard): the first occurrence is kept. Workers compute hashes per shard in parallel; the
cross-shard decisions are taken in one process from those hashes, so the result does not depend
on the number of workers."""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata

import numpy as np

_WS = re.compile(r"\s+")
MINHASH_SCHEME = "affine32"  # datasketch's default permutation scheme, named so stored values stay readable


def _normalisation_table() -> dict[int, int | None]:
    # CCNet: digits -> 0; punctuation and symbols removed; combining marks removed (after NFD this
    # strips accents). One str.translate() call then does all three.
    table: dict[int, int | None] = {}
    for cp in range(min(sys.maxunicode, 0x2FFFF) + 1):
        cat = unicodedata.category(chr(cp))
        if cat == "Nd":
            table[cp] = ord("0")
        elif cat[0] == "P" or cat in ("Sm", "Sc", "Sk", "So", "Mn"):
            table[cp] = None
    return table


_TABLE: dict[int, int | None] | None = None


def _ascii_tables() -> tuple[bytes, bytes]:
    # the same rules for ASCII-only text as bytes.translate tables (much faster than str.translate);
    # \x1c-\x1f become spaces because str.split() treats them as whitespace and bytes.split() does not
    table = bytearray(range(256))
    delete = bytearray()
    for cp in range(128):
        cat = unicodedata.category(chr(cp))
        if cat == "Nd":
            table[cp] = ord("0")
        elif cat[0] == "P" or cat in ("Sm", "Sc", "Sk", "So"):
            delete.append(cp)
    for cp in range(0x1C, 0x20):
        table[cp] = ord(" ")
    return bytes(table), bytes(delete)


_ASCII_TABLE, _ASCII_DELETE = _ascii_tables()


def _normalize_text(text: str) -> str:
    global _TABLE
    if _TABLE is None:
        _TABLE = _normalisation_table()
    text = text.lower()
    if not text.isascii():
        text = unicodedata.normalize("NFD", text)
    return text.translate(_TABLE)


def warm_up() -> None:
    """Build the normalisation table now (before forking workers, so they share it)."""
    _normalize_text("\u00e9")


def normalize_line(line: str) -> str:
    """CCNet's line normalisation: lower case, accents stripped, digits to 0, punctuation removed,
    whitespace collapsed."""
    return " ".join(_normalize_text(line).split())


def hash64(text: str) -> int:
    """A stable 64-bit hash (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def line_hashes(text: str) -> np.ndarray:
    """Hash of the normalised form of each line of `text` (split on "\\n"): hash64 of
    normalize_line(line), with the low bit set; 0 marks lines that normalise to nothing (always
    kept). The whole text is normalised at once (newlines survive normalisation)."""
    if text.isascii():
        lines = [b" ".join(line.split()) for line in
                 text.lower().encode("ascii").translate(_ASCII_TABLE, _ASCII_DELETE).split(b"\n")]
    else:
        lines = [" ".join(line.split()).encode("utf-8", "surrogatepass") for line in _normalize_text(text).split("\n")]
    blake2b = hashlib.blake2b
    out = np.frombuffer(b"".join([blake2b(line, digest_size=8).digest() for line in lines]), dtype="<u8") | np.uint64(1)
    out[np.array([not line for line in lines], dtype=bool)] = 0
    return out.astype(np.uint64)


def shard_line_hashes(flat: np.ndarray) -> np.ndarray:
    """The distinct non-zero line hashes of one shard (what the global step needs)."""
    u = np.unique(flat)
    return u[u != 0]


def earlier_shard_lines(per_shard_unique: list[np.ndarray]) -> list[np.ndarray]:
    """For each shard, the line hashes it shares with an earlier shard (its lines to remove)."""
    if not per_shard_unique:
        return []
    hashes = np.concatenate(per_shard_unique)
    shard = np.concatenate([np.full(len(u), i, dtype=np.int64) for i, u in enumerate(per_shard_unique)])
    order = np.lexsort((shard, hashes))
    hashes, shard = hashes[order], shard[order]
    later = np.zeros(len(hashes), dtype=bool)
    later[1:] = hashes[1:] == hashes[:-1]  # not the first (lowest) shard holding the hash
    return [np.sort(hashes[later & (shard == i)]) for i in range(len(per_shard_unique))]


def keep_first_lines(flat: np.ndarray, seen_before: np.ndarray) -> np.ndarray:
    """Mask over a shard's lines (in order): True for lines kept by line dedup — the first
    occurrence within the shard, and not seen in an earlier shard."""
    keep = np.zeros(len(flat), dtype=bool)
    _, first = np.unique(flat, return_index=True)
    keep[first] = True
    keep[flat == 0] = True
    if len(seen_before):
        keep &= ~np.isin(flat, seen_before, assume_unique=False)
    return keep


def exact_duplicates(per_shard_hashes: list[np.ndarray]) -> list[np.ndarray]:
    """For each shard, a mask of documents whose hash occurred at an earlier (shard, position)."""
    if not per_shard_hashes:
        return []
    hashes = np.concatenate(per_shard_hashes)
    shard = np.concatenate([np.full(len(h), i, dtype=np.int64) for i, h in enumerate(per_shard_hashes)])
    pos = np.concatenate([np.arange(len(h), dtype=np.int64) for h in per_shard_hashes])
    order = np.lexsort((pos, shard, hashes))
    dup_sorted = np.zeros(len(hashes), dtype=bool)
    dup_sorted[1:] = hashes[order][1:] == hashes[order][:-1]
    dup = np.empty_like(dup_sorted)
    dup[order] = dup_sorted
    bounds = np.cumsum([0] + [len(h) for h in per_shard_hashes])
    return [dup[bounds[i]:bounds[i + 1]] for i in range(len(per_shard_hashes))]


def shingles(text: str, n: int = 5) -> set[bytes]:
    """Word n-grams of `text` (lower-cased), the sets whose Jaccard similarity MinHash estimates."""
    words = _WS.split(text.lower().strip())
    if len(words) < n:
        return {" ".join(words).encode("utf-8", "surrogatepass")}
    return {" ".join(words[i:i + n]).encode("utf-8", "surrogatepass") for i in range(len(words) - n + 1)}


def minhash_signature(text: str, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> np.ndarray:
    """datasketch MinHash of the word n-gram set of `text`."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=seed, scheme=MINHASH_SCHEME)
    m.update_batch(list(shingles(text, ngram)))
    return m.hashvalues.copy()


def near_duplicates(per_shard_signatures: list[np.ndarray], threshold: float,
                    skip: list[np.ndarray] | None = None, seed: int = 1) -> list[np.ndarray]:
    """Walk documents in global order with a MinHash LSH index (datasketch): a document whose
    estimated Jaccard similarity with an already kept one reaches `threshold` is a near duplicate;
    otherwise it is kept and indexed. `skip` masks documents already dropped."""
    from datasketch import LeanMinHash, MinHashLSH

    out = []
    lsh = None
    kept: dict[tuple[int, int], np.ndarray] = {}
    for shard, sigs in enumerate(per_shard_signatures):
        dup = np.zeros(len(sigs), dtype=bool)
        for i, hv in enumerate(sigs):
            if skip is not None and skip[shard][i]:
                continue
            if lsh is None:
                lsh = MinHashLSH(threshold=threshold, num_perm=len(hv))
            m = LeanMinHash(seed=seed, hashvalues=hv, scheme=MINHASH_SCHEME)
            # LSH gives candidates; the signatures' estimated Jaccard similarity confirms them
            if any(np.mean(hv == kept[key]) >= threshold for key in lsh.query(m)):
                dup[i] = True
            else:
                lsh.insert((shard, i), m, check_duplication=False)
                kept[(shard, i)] = hv
        out.append(dup)
    return out
