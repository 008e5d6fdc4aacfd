"""Deduplication: CCNet line dedup, exact document dedup, MinHash-LSH near dedup.

Every dedup here is defined on a deterministic global order (shard index, then position in the
shard): the first occurrence is kept. Workers compute hashes per shard in parallel; the
cross-shard decisions are taken per hash partition (each partition task sees only its own
hashes), so the result depends neither on the number of workers nor on the number of partitions."""

from __future__ import annotations

import hashlib
import re
import sys
import unicodedata
from typing import Callable

import numpy as np

_WS = re.compile(r"\s+")
MINHASH_SCHEME = "affine32"  # datasketch's default permutation scheme, named so stored values stay readable
NUM_PERM = 128  # MinHash permutations (values per signature)


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
    """The distinct non-zero line hashes of one shard, sorted (what the partitioned step needs)."""
    u = np.unique(flat)
    return u[u != 0]


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


# Hash partitions -----------------------------------------------------------------------------
# Each cross-shard dedup is decided per partition: partition p owns the hashes h with
# partition_of(h) == p, and sees every occurrence of them (from all shards), so it alone can tell
# which occurrence comes first in the global (shard, position) order. A partition task holds only
# its hashes; the decisions of all partitions together equal one walk over the whole corpus.

EXACT_ENTRY = np.dtype([("hash", "<u8"), ("pos", "<i8")])
BAND_ENTRY = np.dtype([("key", "<u8"), ("pos", "<i8")])


def partition_of(hashes: np.ndarray, partitions: int) -> np.ndarray:
    """The partition owning each hash: the high 32 bits modulo `partitions` (the low bit of a line
    hash is always set, so the low bits would not spread evenly)."""
    return ((np.asarray(hashes, dtype=np.uint64) >> np.uint64(32)) % np.uint64(partitions)).astype(np.int64)


def split_by_partition(entries: np.ndarray, hashes: np.ndarray, partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """`entries` reordered so each partition's rows are contiguous (stable: order inside a
    partition is kept), and the partition offsets (partitions + 1)."""
    part = partition_of(hashes, partitions)
    order = np.argsort(part, kind="stable")
    offsets = np.zeros(partitions + 1, dtype=np.int64)
    np.cumsum(np.bincount(part, minlength=partitions), out=offsets[1:])
    return entries[order], offsets


def exact_partition(per_shard: list[np.ndarray]) -> list[np.ndarray]:
    """One partition of exact dedup. `per_shard[s]`: the (hash, pos) entries of shard s in this
    partition. Returns, per shard, the sorted positions whose hash occurred at an earlier
    (shard, position)."""
    if not per_shard:
        return []
    hashes = np.concatenate([e["hash"] for e in per_shard])
    pos = np.concatenate([e["pos"] for e in per_shard])
    shard = np.concatenate([np.full(len(e), i, dtype=np.int64) for i, e in enumerate(per_shard)])
    order = np.lexsort((pos, shard, hashes))
    later = np.zeros(len(order), dtype=bool)
    later[1:] = hashes[order][1:] == hashes[order][:-1]
    dup_shard, dup_pos = shard[order][later], pos[order][later]
    return [np.sort(dup_pos[dup_shard == i]) for i in range(len(per_shard))]


def line_partition(per_shard_unique: list[np.ndarray]) -> list[np.ndarray]:
    """One partition of line dedup. `per_shard_unique[s]`: shard s's distinct line hashes in this
    partition. Returns, per shard, the hashes it shares with an earlier shard (lines to remove)."""
    if not per_shard_unique:
        return []
    hashes = np.concatenate(per_shard_unique)
    shard = np.concatenate([np.full(len(u), i, dtype=np.int64) for i, u in enumerate(per_shard_unique)])
    order = np.lexsort((shard, hashes))
    hashes, shard = hashes[order], shard[order]
    later = np.zeros(len(hashes), dtype=bool)
    later[1:] = hashes[1:] == hashes[:-1]  # not the first (lowest) shard holding the hash
    return [np.sort(hashes[later & (shard == i)]) for i in range(len(per_shard_unique))]


def shingles(text: str, n: int = 5) -> set[bytes]:
    """Word n-grams of `text` (lower-cased), the sets whose Jaccard similarity MinHash estimates."""
    words = _WS.split(text.lower().strip())
    if len(words) < n:
        return {" ".join(words).encode("utf-8", "surrogatepass")}
    return {" ".join(words[i:i + n]).encode("utf-8", "surrogatepass") for i in range(len(words) - n + 1)}


def minhash_signature(text: str, num_perm: int = NUM_PERM, ngram: int = 5, seed: int = 1) -> np.ndarray:
    """datasketch MinHash of the word n-gram set of `text`."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=seed, scheme=MINHASH_SCHEME)
    m.update_batch(list(shingles(text, ngram)))
    return m.hashvalues.copy()


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's MinHashLSH picks for `threshold`: two documents are
    LSH candidates when all rows of at least one band are equal."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents, bands) 64-bit keys: a hash of the band's number and its signature values. Equal
    keys mark candidate pairs (a rare key collision is caught by comparing the bands themselves)."""
    sigs = np.ascontiguousarray(signatures, dtype="<u8")
    keys = np.zeros((len(sigs), bands), dtype=np.uint64)
    for d in range(len(sigs)):
        for b in range(bands):
            band = sigs[d, b * rows:(b + 1) * rows].tobytes()
            keys[d, b] = int.from_bytes(hashlib.blake2b(band, digest_size=8, salt=b.to_bytes(2, "little")).digest(), "little")
    return keys


GID_SHIFT = 32  # global document id = shard << 32 | position: sorts in the global order


def near_partition(per_shard: list[np.ndarray], signature: Callable[[int, int], np.ndarray],
                   threshold: float, bands: int, rows: int) -> np.ndarray:
    """One partition of MinHash near dedup. `per_shard[s]`: shard s's (band key, pos) entries in
    this partition; `signature(s, pos)` a document's MinHash values. Returns the duplicate pairs
    (earlier gid, later gid) found in this partition's LSH buckets: same band, and estimated
    Jaccard similarity at least `threshold` (the test datasketch's walk applies to candidates)."""
    keys = np.concatenate([e["key"] for e in per_shard]) if per_shard else np.zeros(0, np.uint64)
    gids = np.concatenate([(np.int64(i) << GID_SHIFT) | e["pos"] for i, e in enumerate(per_shard)]) if per_shard \
        else np.zeros(0, np.int64)
    order = np.lexsort((gids, keys))
    keys, gids = keys[order], gids[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    pairs = []
    for a, b in zip(starts.tolist(), ends.tolist()):
        if b - a < 2:
            continue
        members = gids[a:b].tolist()
        sigs = [signature(g >> GID_SHIFT, g & ((1 << GID_SHIFT) - 1)) for g in members]
        for j in range(1, len(members)):
            for i in range(j):
                same_band = any(np.array_equal(sigs[i][k * rows:(k + 1) * rows], sigs[j][k * rows:(k + 1) * rows])
                                for k in range(bands))
                if same_band and np.mean(sigs[i] == sigs[j]) >= threshold:
                    pairs.append((members[i], members[j]))
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def near_decisions(pairs: np.ndarray, skipped: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The near duplicates (sorted gids) from all partitions' pairs: walking documents in global
    order, a document is a near duplicate when it pairs with an earlier document that was kept —
    the decision datasketch's sequential LSH walk takes, needing only the pairs, never all
    signatures. `skipped(gids)` masks documents already dropped (exact duplicates), which neither
    keep nor lose anything here."""
    pairs = np.unique(pairs.reshape(-1, 2), axis=0)
    if len(pairs):
        nodes = np.unique(pairs)
        gone = skipped(nodes)
        pairs = pairs[~np.isin(pairs, nodes[gone]).any(axis=1)]
    earlier: dict[int, list[int]] = {}
    for a, b in pairs.tolist():
        earlier.setdefault(b, []).append(a)
    dup: set[int] = set()
    for b in sorted(earlier):  # every earlier partner of b is decided before b
        if any(a not in dup for a in earlier[b]):
            dup.add(b)
    return np.array(sorted(dup), dtype=np.int64)
