"""GPTDataset windows, splits, caching across restarts and ranks, blending and the mixture report."""
import os

import numpy as np
import pytest
import torch.multiprocessing as mp

from megallama.data.blended import BlendedDataset, build_gpt_datasets, format_mixture_report, mixture_epochs
from megallama.data.gpt_dataset import GPTDataset, MockGPTDataset, parse_data_path, parse_split, split_document_ranges
from megallama.data.indexed import IndexedDataset, IndexedDatasetWriter


def write_dataset(prefix, n_docs, seed, max_len=40, offset=0):
    """Documents whose tokens are distinct running numbers, so any window can be traced back."""
    rng = np.random.default_rng(seed)
    docs, start = [], offset
    with IndexedDatasetWriter(prefix, np.int32) as w:
        for _ in range(n_docs):
            n = int(rng.integers(1, max_len))
            doc = np.arange(start, start + n)
            start += n
            docs.append(doc)
            w.add_document(doc)
    return docs


def expected_windows(ds: GPTDataset, docs):
    stream = np.concatenate([docs[d] for d in ds.document_index])
    seq = ds.seq_length
    return [stream[j * seq: j * seq + seq + 1] for j in range(len(ds))]


def test_windows_follow_the_shuffled_document_stream(tmp_path):
    docs = write_dataset(str(tmp_path / "d"), 300, 0)
    ds = GPTDataset(IndexedDataset(str(tmp_path / "d")), 0, 300, num_samples=500, seq_length=16, seed=1)
    assert ds.num_epochs > 1 and len(ds) >= 500
    counts = np.bincount(ds.document_index, minlength=300)
    assert (counts == ds.num_epochs).all()
    want = expected_windows(ds, docs)
    for i in range(len(ds)):
        item = ds[i]
        window = want[int(ds.shuffle_index[i])]
        assert item["tokens"].dtype == np.int64 and item["tokens"].shape == (16,)
        np.testing.assert_array_equal(item["tokens"], window[:-1])
        np.testing.assert_array_equal(item["labels"], window[1:])
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))


def test_deterministic_for_a_seed_and_cached(tmp_path):
    prefix = str(tmp_path / "d")
    write_dataset(prefix, 100, 0)
    cache = str(tmp_path / "cache")
    a = GPTDataset(IndexedDataset(prefix), 0, 100, 50, 8, seed=3, cache_dir=cache)
    files = sorted(os.listdir(cache))
    assert len(files) == 4 and any(f.endswith("description.json") for f in files)
    b = GPTDataset(IndexedDataset(prefix), 0, 100, 50, 8, seed=3, cache_dir=cache)
    assert isinstance(b.sample_index, np.memmap)  # loaded, not rebuilt
    assert sorted(os.listdir(cache)) == files
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = GPTDataset(IndexedDataset(prefix), 0, 100, 50, 8, seed=4, cache_dir=cache)
    assert not np.array_equal(a.document_index, c.document_index)
    assert len(os.listdir(cache)) == 8
    # an interrupted build (no description marker) is rebuilt, not trusted
    marker = next(os.path.join(cache, f) for f in files if f.endswith("description.json"))
    os.remove(marker)
    d = GPTDataset(IndexedDataset(prefix), 0, 100, 50, 8, seed=3, cache_dir=cache)
    assert os.path.exists(marker)
    np.testing.assert_array_equal(a.shuffle_index, d.shuffle_index)


def test_split_syntax_matches_megatron():
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    for split in ["969,30,1", "99,1", "1", "80/10/10", "0.7,0.2,0.1", "100,0,0"]:
        assert np.allclose(parse_split(split), parse_and_normalize_split(split))
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
        for n in (1, 7, 1000, 12345):
            ranges = split_document_ranges(n, split)
            for (begin, end), bookends in zip(ranges, matrix):
                if bookends is None:
                    assert begin == end
                else:
                    assert (begin, end) == (int(round(bookends[0] * n)), int(round(bookends[1] * n)))
    with pytest.raises(ValueError, match="sums to zero"):
        parse_split("0,0,0")


def test_data_path_syntax():
    assert parse_data_path(["/data/a"]) == (["/data/a"], [1.0])
    assert parse_data_path("3 /data/a 1 /data/b") == (["/data/a", "/data/b"], [0.75, 0.25])
    assert parse_data_path(["0.5", "a", "0.5", "b"]) == (["a", "b"], [0.5, 0.5])
    with pytest.raises(ValueError, match="weight of"):
        parse_data_path(["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="pairs"):
        parse_data_path(["1", "a", "2"])


def test_build_gpt_datasets_single_prefix_splits(tmp_path):
    prefix = str(tmp_path / "d")
    docs = write_dataset(prefix, 1000, 1)
    train, valid, test = build_gpt_datasets([prefix], "969,30,1", 32, (200, 20, 0), seed=5)
    assert len(train) >= 200 and len(valid) >= 20 and test is None
    train_docs = set(np.unique(train.document_index).tolist())
    assert train_docs == set(range(969))
    assert set(np.unique(valid.document_index).tolist()) == set(range(969, 999))
    assert os.path.isdir(tmp_path / "cache")
    np.testing.assert_array_equal(valid[3]["tokens"], expected_windows(valid, docs)[int(valid.shuffle_index[3])][:-1])
    _, one_epoch, none_test = build_gpt_datasets([prefix], "99,1", 8, (10, None, 10), seed=5)
    assert none_test is None  # the split gives test no documents
    assert one_epoch.num_epochs == 1 and (np.bincount(one_epoch.document_index)[990:] == 1).all()


def test_blend_of_three_sources_follows_weights(tmp_path):
    prefixes = []
    for k, n in enumerate([400, 200, 300]):
        p = str(tmp_path / f"src{k}")
        write_dataset(p, n, 10 + k, offset=1_000_000 * k)
        prefixes.append(p)
    path = ["0.6", prefixes[0], "0.3", prefixes[1], "0.1", prefixes[2]]
    train, valid, _ = build_gpt_datasets(path, "90,10,0", 16, (2000, 100, 0), seed=0, cache_dir=str(tmp_path / "c"))
    assert isinstance(train, BlendedDataset) and len(train) == 2000
    counts = np.bincount(train.dataset_index, minlength=3)
    assert np.abs(counts - np.array([0.6, 0.3, 0.1]) * 2000).max() <= 1
    for i in range(0, 2000, 97):
        item = train[i]
        # token values identify their source (offsets of a million per source)
        assert set((item["tokens"] // 1_000_000).tolist()) == {item["dataset_id"]}
    again, _, _ = build_gpt_datasets(path, "90,10,0", 16, (2000, 100, 0), seed=0, cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(again[123]["tokens"], train[123]["tokens"])


def test_blend_refuses_datasets_too_small():
    with pytest.raises(ValueError, match="needs"):
        BlendedDataset([MockGPTDataset(4, 10, 5), MockGPTDataset(4, 10, 100)], [0.5, 0.5], 50)


def _rank_builds(rank, world, init_file, prefix, cache, out_dir):
    import torch.distributed as dist

    from megallama.data import gpt_dataset

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    built = []
    original = gpt_dataset.GPTDataset._build
    gpt_dataset.GPTDataset._build = lambda self, *a: built.append(1) or original(self, *a)
    train, _, _ = build_gpt_datasets([prefix], "1", 8, (300, 0, 0), seed=7, cache_dir=cache)
    np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.stack([train[i]["tokens"] for i in range(len(train))]))
    np.save(os.path.join(out_dir, f"built{rank}.npy"), np.array(len(built)))
    dist.destroy_process_group()


def test_one_rank_builds_the_others_load(tmp_path):
    prefix = str(tmp_path / "d")
    write_dataset(prefix, 200, 2)
    # fork: the ranks need nothing but this process's imports (spawn would re-import torch twice)
    mp.start_processes(_rank_builds, args=(2, str(tmp_path / "init"), prefix, str(tmp_path / "cache"), str(tmp_path)),
                       nprocs=2, start_method="fork")
    assert int(np.load(tmp_path / "built0.npy")) == 1
    assert int(np.load(tmp_path / "built1.npy")) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy"))


def test_mock_dataset_is_a_function_of_the_sample_number():
    a, b = MockGPTDataset(16, 100, 50, seed=1), MockGPTDataset(16, 100, 50, seed=1)
    np.testing.assert_array_equal(a[7]["tokens"], b[7]["tokens"])
    np.testing.assert_array_equal(a[7]["labels"][:-1], a[7]["tokens"][1:])
    assert not np.array_equal(a[7]["tokens"], a[8]["tokens"])
    assert not np.array_equal(a[7]["tokens"], MockGPTDataset(16, 100, 50, seed=2)[7]["tokens"])
    assert a[0]["tokens"].dtype == np.int64 and a[0]["tokens"].max() < 100 and len(a) == 50
    with pytest.raises(IndexError):
        a[50]


def test_mixture_report_gives_epochs_per_source(tmp_path):
    prefixes = []
    for k, n in enumerate([100, 50]):
        p = str(tmp_path / f"s{k}")
        write_dataset(p, n, k)
        prefixes.append(p)
    rows = mixture_epochs(["3", prefixes[0], "1", prefixes[1]], train_tokens=10_000)
    for row, share in zip(rows, [0.75, 0.25]):
        assert row["tokens"] == IndexedDataset(row["prefix"]).num_tokens
        assert row["epochs"] == pytest.approx(share * 10_000 / row["tokens"])
    text = format_mixture_report(rows)
    assert "s0" in text and "75.00%" in text


def test_mixture_report_reproduces_the_papers_epochs(tmp_path, capsys):
    from megallama.data.blended import LLAMA_MIXTURE
    from tests.data.helpers import load_tool

    train_tokens = 1.4e6  # the paper's 1.4T, scaled down a million times
    data_path = []
    for name, (share, epochs) in LLAMA_MIXTURE.items():
        prefix = str(tmp_path / name)
        with IndexedDatasetWriter(prefix, np.uint16) as w:  # a source of the size Table 1 implies
            w.add_document(np.zeros(int(round(share / 100 * train_tokens / epochs)), np.uint16))
        data_path += [str(share), prefix]
    rows = mixture_epochs(data_path, train_tokens)
    for row, (share, epochs) in zip(rows, LLAMA_MIXTURE.values()):
        assert row["weight"] == pytest.approx(share / 100)
        assert row["epochs"] == pytest.approx(epochs, rel=1e-4)
    assert load_tool("mixture_report").main(["--data-path", *data_path, "--train-tokens", "1.4e6"]) == 0
    out = capsys.readouterr().out
    assert "CommonCrawl" in out and "67.00%" in out and " 2.45" in out
    # the paper's real 1.4e12: drawn tokens overflowed their 14-character column
    assert load_tool("mixture_report").main(["--data-path", *data_path, "--train-tokens", "1.4e12"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "938,000,000,000" in lines[1] and len({len(line) for line in lines}) == 1
    for column in ("share", "tokens", "drawn", "epochs"):  # right-aligned: every cell ends under its header's end
        end = lines[0].index(column) + len(column)
        assert all(line[end - 1] != " " and (end == len(line) or line[end] == " ") for line in lines), (column, lines)


def test_mixture_report_tool_errors_are_one_line(tmp_path, capsys):
    from tests.data.helpers import load_tool

    write_dataset(str(tmp_path / "s0"), 20, 0)
    tool = load_tool("mixture_report")
    for data_path, message in [(["1", str(tmp_path / "missing")], "missing.idx does not exist"),
                               (["1", str(tmp_path / "s0"), "2"], "expected one prefix or weight/prefix pairs")]:
        assert tool.main(["--data-path", *data_path, "--train-tokens", "1e6"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--data-path", str(tmp_path / "s0"), "--train-tokens", "-5"])
    assert exit_.value.code == 2 and "--train-tokens must be positive" in capsys.readouterr().err
