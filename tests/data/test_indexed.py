"""Our .bin/.idx files against megatron-core's IndexedDataset, in both directions."""
import filecmp
import os

import numpy as np
import pytest
import torch

from megallama.data.indexed import IndexedDataset, IndexedDatasetWriter, merge_indexed_datasets, optimal_dtype
from tests.data.helpers import load_tool

mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def random_documents(rng, n_docs, vocab, max_seqs=3):
    docs = []
    for _ in range(n_docs):
        docs.append([rng.integers(0, vocab, size=rng.integers(0, 50)) for _ in range(rng.integers(1, max_seqs + 1))])
    return docs


@pytest.mark.parametrize("vocab", [32000, 100_000])
def test_ours_written_megatron_reads_and_bytes_identical(tmp_path, vocab):
    rng = np.random.default_rng(0)
    docs = random_documents(rng, 200, vocab)
    dtype = optimal_dtype(vocab)
    assert dtype == (np.uint16 if vocab < 65500 else np.int32)

    ours = str(tmp_path / "ours")
    with IndexedDatasetWriter(ours, dtype) as w:
        for doc in docs:
            for seq in doc:
                w.add_item(seq)
            w.end_document()

    theirs = str(tmp_path / "theirs")
    builder = mcore.IndexedDatasetBuilder(theirs + ".bin", dtype=dtype.type)
    for doc in docs:
        for seq in doc:
            builder.add_item(torch.from_numpy(seq))
        builder.end_document()
    builder.finalize(theirs + ".idx")

    assert filecmp.cmp(ours + ".bin", theirs + ".bin", shallow=False)
    assert filecmp.cmp(ours + ".idx", theirs + ".idx", shallow=False)

    ref = mcore.IndexedDataset(ours)
    flat = [s for d in docs for s in d]
    assert len(ref) == len(flat)
    for i, seq in enumerate(flat):
        np.testing.assert_array_equal(ref[i], seq)
    np.testing.assert_array_equal(ref.document_indices, np.cumsum([0] + [len(d) for d in docs]))


def test_megatron_written_ours_reads(tmp_path):
    rng = np.random.default_rng(1)
    docs = random_documents(rng, 150, 32000)
    prefix = str(tmp_path / "mc")
    builder = mcore.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.from_numpy(np.concatenate(doc)), [len(s) for s in doc])
    builder.finalize(prefix + ".idx")

    ours = IndexedDataset(prefix)
    ref = mcore.IndexedDataset(prefix)
    assert ours.dtype == np.uint16 and len(ours) == len(ref)
    np.testing.assert_array_equal(ours.sequence_lengths, ref.sequence_lengths)
    np.testing.assert_array_equal(ours.document_indices, ref.document_indices)
    for i in range(len(ref)):
        np.testing.assert_array_equal(ours[i], ref[i])
        if ref.sequence_lengths[i] > 3:
            np.testing.assert_array_equal(ours.get(i, 1, 2), ref.get(i, 1, 2))
    assert ours.num_documents == len(docs)
    for d, doc in enumerate(docs):
        got = ours.document(d)
        assert len(got) == len(doc) and all(np.array_equal(a, b) for a, b in zip(got, doc))


def test_merge_matches_megatron_add_index(tmp_path):
    rng = np.random.default_rng(2)
    prefixes = []
    for k in range(3):
        p = str(tmp_path / f"part{k}")
        with IndexedDatasetWriter(p, np.uint16) as w:
            for doc in random_documents(rng, 40 + k, 1000):
                w.add_document(np.concatenate(doc), [len(s) for s in doc])
        prefixes.append(p)
    merged = merge_indexed_datasets(prefixes, str(tmp_path / "merged"))
    assert load_tool("merge_datasets").main(["--input", *prefixes, "--output-prefix", str(tmp_path / "by_tool")]) == 0
    assert filecmp.cmp(str(tmp_path / "merged.bin"), str(tmp_path / "by_tool.bin"), shallow=False)
    assert filecmp.cmp(str(tmp_path / "merged.idx"), str(tmp_path / "by_tool.idx"), shallow=False)

    ref_prefix = str(tmp_path / "ref")
    builder = mcore.IndexedDatasetBuilder(ref_prefix + ".bin", dtype=np.uint16)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(ref_prefix + ".idx")
    assert filecmp.cmp(str(tmp_path / "merged.idx"), ref_prefix + ".idx", shallow=False)
    assert filecmp.cmp(str(tmp_path / "merged.bin"), ref_prefix + ".bin", shallow=False)
    assert len(merged) == sum(len(IndexedDataset(p)) for p in prefixes)


def test_bulk_add_documents_writes_the_same_bytes(tmp_path):
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 1000, size=int(rng.integers(0, 30))) for _ in range(100)]
    with IndexedDatasetWriter(str(tmp_path / "one"), np.uint16) as w:
        for d in docs:
            w.add_document(d)
    with IndexedDatasetWriter(str(tmp_path / "bulk"), np.uint16) as w:
        w.add_documents(np.concatenate(docs[:60]), [len(d) for d in docs[:60]])
        w.add_documents(np.concatenate(docs[60:]).astype(np.int32), [len(d) for d in docs[60:]])
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(str(tmp_path / f"one{ext}"), str(tmp_path / f"bulk{ext}"), shallow=False)


def test_exception_leaves_no_files(tmp_path):
    prefix = str(tmp_path / "crash")
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, np.uint16) as w:
            w.add_document(np.arange(10))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_bad_inputs_raise_clear_errors(tmp_path):
    prefix = str(tmp_path / "x")
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        with pytest.raises(ValueError, match="do not fit"):
            w.add_item(np.array([70000]))
        w.add_document(np.arange(100))
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match="truncated"):
        IndexedDataset(prefix)
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"NOTANIDX!")
    with pytest.raises(ValueError, match="bad magic"):
        IndexedDataset(prefix)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        IndexedDataset(str(tmp_path / "missing"))


def test_merge_tool_errors_are_one_line_and_a_bad_last_input_fails_before_copying(tmp_path, capsys, monkeypatch):
    with IndexedDatasetWriter(str(tmp_path / "a"), np.uint16) as w:
        w.add_document(np.arange(10))
    with IndexedDatasetWriter(str(tmp_path / "wide"), np.int32) as w:
        w.add_document(np.arange(10))
    copied = []
    monkeypatch.setattr(IndexedDatasetWriter, "add_index", lambda self, prefix: copied.append(prefix))
    merge = load_tool("merge_datasets")
    for last, message in [("missing", "missing.idx does not exist"), ("wide", "wide (int32) into a uint16 dataset"),
                          # was only "a.bin.idx does not exist"
                          ("a.bin", f"a.bin.idx does not exist; name the dataset by its prefix, {tmp_path / 'a'}, "
                                    "without .bin/.idx")]:
        assert merge.main(["--input", str(tmp_path / "a"), str(tmp_path / last), "--output-prefix", str(tmp_path / "m")]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert copied == [] and not any(n.startswith("m") for n in os.listdir(tmp_path))
