"""Dedup stages against plain sequential references (a Python set walked in global order)."""

import random

import numpy as np

from megallama.clean import dedup
from tests.clean.samples import SENTENCES, page


def test_normalize_line_is_ccnet_like():
    assert dedup.normalize_line("  Héllo, WORLD!!  2023 — Ça va?  ") == "hello world 0000 ca va"
    assert dedup.normalize_line("Price: 12.50 €") == dedup.normalize_line("price 99,99")
    assert dedup.normalize_line("...!!!") == ""


def test_line_hashes_fast_paths_equal_hash_of_normalize_line():
    rng = random.Random(7)
    alphabet = [chr(c) for c in range(128)] + list("éÉçÇßøİıﬁ€—“”…½٣")
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        for candidate in (text, text.encode("ascii", "ignore").decode()):
            expected = [dedup.hash64(dedup.normalize_line(line)) | 1 if dedup.normalize_line(line) else 0
                        for line in candidate.split("\n")]
            assert dedup.line_hashes(candidate).tolist() == expected


def _random_shards(rng, n_shards=4, docs=6):
    pool = [s for lang in SENTENCES.values() for s in lang] + ["", "   ", "Price: 10 EUR", "price 99 eur"]
    return [[[rng.choice(pool) for _ in range(rng.randint(1, 8))] for _ in range(docs)] for _ in range(n_shards)]


def test_line_dedup_equals_sequential_walk():
    rng = random.Random(0)
    for _ in range(20):
        shards = _random_shards(rng)
        # reference: one set over all lines in (shard, doc, line) order
        seen, expected = set(), []
        for docs in shards:
            kept = []
            for lines in docs:
                for line in lines:
                    norm = dedup.normalize_line(line)
                    kept.append(not norm or norm not in seen)
                    if norm:
                        seen.add(norm)
            expected.append(kept)
        flats = [np.concatenate([dedup.line_hashes("\n".join(lines)) for lines in docs]) for docs in shards]
        earlier = dedup.earlier_shard_lines([dedup.shard_line_hashes(f) for f in flats])
        got = [dedup.keep_first_lines(f, e).tolist() for f, e in zip(flats, earlier)]
        assert got == expected


def test_exact_duplicates_equals_sequential_walk():
    rng = random.Random(1)
    for _ in range(20):
        shards = [rng.choices(range(8), k=rng.randint(0, 6)) for _ in range(4)]
        seen, expected = set(), []
        for values in shards:
            expected.append([v in seen or seen.add(v) is not None for v in values])
        got = dedup.exact_duplicates([np.array([dedup.hash64(str(v)) for v in s], dtype=np.uint64) for s in shards])
        assert [g.tolist() for g in got] == expected


def test_near_duplicates_keep_first_and_drop_close_copies():
    rng = random.Random(2)
    vocab = sorted({w for lang in SENTENCES.values() for s in lang for w in s.split()})
    books = [" ".join(rng.choices(vocab, k=3000)) for _ in range(3)]
    words = books[0].split()
    edited = " ".join(w if i % 300 else "changed" for i, w in enumerate(words))  # 10 words changed
    halves = " ".join(words[: len(words) // 2])
    jaccard = lambda x, y: len(dedup.shingles(x) & dedup.shingles(y)) / len(dedup.shingles(x) | dedup.shingles(y))
    assert jaccard(books[0], edited) > 0.95 and jaccard(books[0], halves) < 0.6
    sigs = [[dedup.minhash_signature(t) for t in (books[0], books[1])],
            [dedup.minhash_signature(t) for t in (edited, halves, books[2], books[1])]]
    got = dedup.near_duplicates([np.stack(s) for s in sigs], threshold=0.9)
    assert [g.tolist() for g in got] == [[False, False], [True, False, False, True]]
    # an already-dropped first copy is not indexed: the second copy is then kept
    skip = [np.array([True, False]), np.zeros(4, dtype=bool)]
    got = dedup.near_duplicates([np.stack(s) for s in sigs], threshold=0.9, skip=skip)
    assert got[1].tolist() == [False, False, False, True]


def test_minhash_estimates_jaccard():
    rng = random.Random(3)
    a = page(rng, "en", 40)
    b = a + "\n" + page(rng, "en", 40)
    sa, sb = dedup.shingles(a), dedup.shingles(b)
    true = len(sa & sb) / len(sa | sb)
    est = float(np.mean(dedup.minhash_signature(a, num_perm=256) == dedup.minhash_signature(b, num_perm=256)))
    assert abs(est - true) < 0.1
