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


def _partitioned(per_shard, hashes_of, partitions, decide):
    """Split each shard's entries by partition, decide each partition alone, gather per shard."""
    split = [dedup.split_by_partition(e, hashes_of(e), partitions) for e in per_shard]
    results = [decide([entries[off[p]:off[p + 1]] for entries, off in split]) for p in range(partitions)]
    return [np.sort(np.concatenate([r[s] for r in results])) for s in range(len(per_shard))]


def test_line_dedup_equals_sequential_walk():
    rng = random.Random(0)
    for trial in range(20):
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
        earlier = _partitioned([dedup.shard_line_hashes(f) for f in flats], lambda u: u, 1 + trial % 4,
                               dedup.line_partition)
        got = [dedup.keep_first_lines(f, e).tolist() for f, e in zip(flats, earlier)]
        assert got == expected


def test_exact_duplicates_equals_sequential_walk():
    rng = random.Random(1)
    for trial in range(20):
        shards = [rng.choices(range(8), k=rng.randint(0, 6)) for _ in range(4)]
        seen, expected = set(), []
        for values in shards:
            expected.append([v in seen or seen.add(v) is not None for v in values])
        entries = []
        for values in shards:
            e = np.zeros(len(values), dtype=dedup.EXACT_ENTRY)
            e["hash"], e["pos"] = [dedup.hash64(str(v)) for v in values], np.arange(len(values))
            entries.append(e)
        dups = _partitioned(entries, lambda e: e["hash"], 1 + trial % 5, dedup.exact_partition)
        assert [np.isin(np.arange(len(v)), d).tolist() for v, d in zip(shards, dups)] == expected


def datasketch_walk(per_shard_signatures, threshold, skip=None):
    """The reference: documents in global order through one datasketch MinHashLSH index; a document
    is a near duplicate when a kept candidate's estimated similarity reaches `threshold`."""
    from datasketch import LeanMinHash, MinHashLSH

    out, lsh, kept = [], None, {}
    for shard, sigs in enumerate(per_shard_signatures):
        dup = np.zeros(len(sigs), dtype=bool)
        for i, hv in enumerate(sigs):
            if skip is not None and skip[shard][i]:
                continue
            lsh = lsh or MinHashLSH(threshold=threshold, num_perm=len(hv))
            m = LeanMinHash(seed=1, hashvalues=hv, scheme=dedup.MINHASH_SCHEME)
            if any(np.mean(hv == kept[key]) >= threshold for key in lsh.query(m)):
                dup[i] = True
            else:
                lsh.insert((shard, i), m, check_duplication=False)
                kept[(shard, i)] = hv
        out.append(dup)
    return out


def partitioned_near(per_shard_signatures, threshold, partitions, skip=None):
    bands, rows = dedup.lsh_bands(threshold, 128)
    entries = []
    for sigs in per_shard_signatures:
        keys = dedup.band_keys(sigs, bands, rows)
        e = np.zeros(keys.size, dtype=dedup.BAND_ENTRY)
        e["key"], e["pos"] = keys.ravel(), np.repeat(np.arange(len(sigs)), bands)
        entries.append(dedup.split_by_partition(e, e["key"], partitions))
    pairs = np.concatenate([dedup.near_partition([e[off[p]:off[p + 1]] for e, off in entries],
                                                 lambda s, i: per_shard_signatures[s][i], threshold, bands, rows)
                            for p in range(partitions)])

    def skipped(gids):
        return np.array([bool(skip[g >> dedup.GID_SHIFT][g & 0xFFFFFFFF]) if skip else False for g in gids.tolist()],
                        dtype=bool)

    dup = dedup.near_decisions(pairs, skipped)
    return [np.isin(np.arange(len(s)), dup[dup >> dedup.GID_SHIFT == i] & 0xFFFFFFFF)
            for i, s in enumerate(per_shard_signatures)]


def test_near_duplicates_keep_first_and_drop_close_copies():
    rng = random.Random(2)
    vocab = sorted({w for lang in SENTENCES.values() for s in lang for w in s.split()})
    books = [" ".join(rng.choices(vocab, k=3000)) for _ in range(3)]
    words = books[0].split()
    edited = " ".join(w if i % 300 else "changed" for i, w in enumerate(words))  # 10 words changed
    halves = " ".join(words[: len(words) // 2])
    jaccard = lambda x, y: len(dedup.shingles(x) & dedup.shingles(y)) / len(dedup.shingles(x) | dedup.shingles(y))
    assert jaccard(books[0], edited) > 0.95 and jaccard(books[0], halves) < 0.6
    sigs = [np.stack([dedup.minhash_signature(t) for t in (books[0], books[1])]),
            np.stack([dedup.minhash_signature(t) for t in (edited, halves, books[2], books[1])])]
    for partitions in (1, 3):
        got = partitioned_near(sigs, 0.9, partitions)
        assert [g.tolist() for g in got] == [[False, False], [True, False, False, True]]
        # an already-dropped first copy is not indexed: the second copy is then kept
        skip = [np.array([True, False]), np.zeros(4, dtype=bool)]
        assert partitioned_near(sigs, 0.9, partitions, skip)[1].tolist() == [False, False, False, True]


def test_near_dedup_equals_datasketch_walk_on_chains_of_copies():
    """Chains (A ~ B ~ C, A !~ C) are where keeping 'the first of each cluster' would differ from
    the sequential walk; the partitioned decisions must follow the walk."""
    rng = random.Random(4)
    vocab = sorted({w for lang in SENTENCES.values() for s in lang for w in s.split()})
    for trial in range(3):
        base = rng.choices(vocab, k=800)
        texts = []
        for _ in range(12):
            words = list(rng.choice(texts).split()) if texts and rng.random() < 0.8 else list(base)
            for _ in range(rng.randint(0, 12)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            texts.append(" ".join(words))
        sigs = [np.stack([dedup.minhash_signature(t) for t in texts[i:i + 4]]) for i in range(0, 12, 4)]
        skip = [rng.random() < 0.2 for _ in range(12)]
        skip = [np.array(skip[i:i + 4]) for i in range(0, 12, 4)]
        for threshold in (0.8, 0.9):
            expected = [d.tolist() for d in datasketch_walk(sigs, threshold, skip)]
            assert sum(map(sum, expected)) > 0
            for partitions in (1, 2, 5):
                assert [d.tolist() for d in partitioned_near(sigs, threshold, partitions, skip)] == expected


def test_minhash_estimates_jaccard():
    rng = random.Random(3)
    a = page(rng, "en", 40)
    b = a + "\n" + page(rng, "en", 40)
    sa, sb = dedup.shingles(a), dedup.shingles(b)
    true = len(sa & sb) / len(sa | sb)
    est = float(np.mean(dedup.minhash_signature(a, num_perm=256) == dedup.minhash_signature(b, num_perm=256)))
    assert abs(est - true) < 0.1
