"""Issue 19, items 6-7 (inputs): a truncated compressed input is counted and its cut text dropped;
a decompression bomb stops at the record cap instead of taking the machine's memory;
--keep-rejected keeps the text of pages the C4 rules drop."""

import bz2
import gzip
import io
import json
import lzma
import os
import random
import subprocess
import sys
import tarfile

import pytest
import zstandard

from megallama.compressed import TruncatedInput, open_binary
from megallama.clean.runner import clean_corpus
from megallama.clean.sources import make_source
from tests.clean import inputs
from tests.clean.samples import page

pytestmark = pytest.mark.faults

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPRESSORS = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
               "zst": lambda data: zstandard.ZstdCompressor().compress(data)}


def long_pages(n, seed=0):
    rng = random.Random(seed)
    return [(f"https://example.com/{i}", "\n".join(page(rng) for _ in range(8))) for i in range(n)]


def output_rows(folder):
    return [json.loads(line) for name in sorted(os.listdir(folder)) if name.endswith(".jsonl")
            for line in (folder / name).read_text().splitlines()]


def test_a_wet_gz_cut_inside_its_last_record_is_counted_and_the_cut_text_dropped(tmp_path):
    pages = long_pages(3)
    inputs.write_wet(str(tmp_path / "whole.wet.gz"), pages)
    data = (tmp_path / "whole.wet.gz").read_bytes()
    (tmp_path / "cut.wet.gz").write_bytes(data[:-300])  # inside the last record's gzip member
    report = clean_corpus(make_source("commoncrawl"), [str(tmp_path / "cut.wet.gz")], str(tmp_path / "out"),
                          str(tmp_path / "r.json"), progress=False)
    kept = output_rows(tmp_path / "out")
    assert report["dropped"].get("unreadable_input") == 1, report
    assert [r["meta"]["url"] for r in kept] == [pages[0][0], pages[1][0]]  # the whole records stay


def test_an_uncompressed_wet_record_shorter_than_its_content_length_is_truncated_input(tmp_path):
    pages = long_pages(3, seed=1)
    inputs.write_wet(str(tmp_path / "whole.wet.gz"), pages)
    raw = gzip.decompress((tmp_path / "whole.wet.gz").read_bytes())
    (tmp_path / "cut.wet").write_bytes(raw[:-1000])
    items = list(make_source("commoncrawl").read(str(tmp_path / "cut.wet")))
    assert [type(i).__name__ for i in items] == ["Document", "Document", "Rejected"]
    cut = items[2]
    assert cut.reason == "truncated_input" and cut.raw == ""
    assert cut.meta["bytes"] < cut.meta["content_length"] == len(pages[2][1].encode())


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_a_compressed_jsonl_that_ends_early_keeps_whole_lines_and_counts_the_damage(tmp_path, kind):
    rows = [{"url": f"u{i}", "text": text} for i, (_, text) in enumerate(long_pages(120, seed=2))]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / f"whole.jsonl.{kind}").write_bytes(COMPRESSORS[kind](data))
    whole = make_source("commoncrawl").read(str(tmp_path / f"whole.jsonl.{kind}"))
    assert [d.meta["url"] for d in whole] == [r["url"] for r in rows]  # an intact file reads whole
    packed = COMPRESSORS[kind](data)
    (tmp_path / f"cut.jsonl.{kind}").write_bytes(packed[: len(packed) * 3 // 4])
    read = []
    with pytest.raises(TruncatedInput, match="ends early"):
        for doc in make_source("commoncrawl").read(str(tmp_path / f"cut.jsonl.{kind}")):
            read.append(doc)
    assert all(type(d).__name__ == "Document" for d in read)  # no cut line comes back
    assert [d.text for d in read] == [r["text"] for r in rows[: len(read)]]
    report = clean_corpus("commoncrawl", [str(tmp_path / f"cut.jsonl.{kind}")], str(tmp_path / "out"),
                          str(tmp_path / "r.json"), progress=False)
    assert report["dropped"].get("unreadable_input") == 1


def bulk_tar(papers: dict[str, bytes]) -> bytes:
    """arXiv's bulk layout: one gzip per paper."""
    return inputs.tar_bytes({f"2301/{pid}.gz": gzip.compress(tex) for pid, tex in papers.items()})


def arxiv_paper(title: str, rng) -> bytes:
    return (f"\\documentclass{{article}}\\begin{{document}}\\section{{{title}}}\n{page(rng)}\n"
            "\\end{document}\n").encode()


def test_a_cut_arxiv_tar_keeps_the_papers_before_the_cut_and_counts_the_cut_one(tmp_path):
    rng = random.Random(3)
    papers = {f"2301.0000{i}": arxiv_paper(f"Part {i}", rng) + os.urandom(3000).hex().encode() for i in range(3)}
    data = bulk_tar(papers)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        third = tar.getmembers()[2]
    (tmp_path / "bulk.tar").write_bytes(data[: third.offset_data + third.size // 2])  # inside the third member
    items = list(make_source("arxiv").read(str(tmp_path / "bulk.tar")))
    assert [(type(i).__name__, i.meta["id"]) for i in items] == [
        ("Document", "2301.00000"), ("Document", "2301.00001"), ("Rejected", "2301.00002")]
    assert items[2].reason == "truncated_input"
    packed = gzip.compress(data)  # the same bulk tar gzipped, cut: the damage is in the gzip stream
    (tmp_path / "bulk.tar.gz").write_bytes(packed[: len(packed) - 2000])
    items = list(make_source("arxiv").read(str(tmp_path / "bulk.tar.gz")))
    assert [type(i).__name__ for i in items[:-1]] == ["Document"] * (len(items) - 1) and len(items) >= 2
    assert items[-1].reason == "truncated_input"


def test_records_over_the_cap_are_too_large_in_every_reader(tmp_path):
    rng = random.Random(4)
    big, small = "x " * 3000, page(rng)
    cap = 4096
    inputs.write_jsonl(str(tmp_path / "a.jsonl.gz"), [{"url": "s", "text": small}, {"url": "b", "text": big},
                                                      {"url": "s2", "text": small}])
    inputs.write_wet(str(tmp_path / "a.wet.gz"), [("s", small), ("b", big)])
    (tmp_path / "book.txt.gz").write_bytes(gzip.compress(big.encode()))
    inputs.write_wiki_dump(str(tmp_path / "wiki.xml.bz2"), [inputs.wiki_page(1, "Big", big),
                                                            inputs.wiki_page(2, "Small", small)])
    inputs.write_posts_xml(str(tmp_path / "Posts.xml"), [{"Id": 1, "PostTypeId": 1, "Title": "Q", "Body": big},
                                                         {"Id": 2, "PostTypeId": 1, "Title": "Q", "Body": small}])

    def reasons(source, path):
        return [getattr(i, "reason", "kept") for i in make_source(source, max_record_bytes=cap).read(str(path))]

    assert reasons("commoncrawl", tmp_path / "a.jsonl.gz") == ["kept", "too_large", "kept"]
    assert reasons("commoncrawl", tmp_path / "a.wet.gz") == ["kept", "too_large"]
    assert reasons("books", tmp_path / "book.txt.gz") == ["too_large"]
    assert reasons("wikipedia", tmp_path / "wiki.xml.bz2") == ["too_large", "kept"]
    assert reasons("stackexchange", tmp_path / "Posts.xml") == ["too_large", "kept"]
    with pytest.raises(ValueError, match="max_record_bytes"):
        make_source("books", max_record_bytes=0)


def write_gzip_bomb(fileobj, size: int, prefix: bytes = b"", suffix: bytes = b"") -> None:
    """`prefix`, `size` zero bytes (spaces), `suffix`, gzipped while streaming (never all in memory)."""
    with gzip.GzipFile(fileobj=fileobj, mode="wb", compresslevel=1) as gz:
        gz.write(prefix)
        block = b" " * (1 << 20)
        for _ in range(size >> 20):
            gz.write(block)
        gz.write(suffix)


BOMB_BYTES = 200 << 20
CAP = 8 << 20
# The child's peak RSS: ~60 MB here with the cap; the uncapped readers held the 200 MB bomb at
# least once (460 MB for the arXiv member, 720 MB for the JSONL line: bytes, then str).
RSS_LIMIT_KB = 160_000


def clean_in_child(source: str, input_path, out, max_record_bytes: int) -> tuple[dict, int]:
    """tools/clean_corpus.py in a fresh interpreter; (report, its peak RSS in KB)."""
    # VmHWM, not getrusage: Linux carries ru_maxrss over exec, so a child would report the test
    # process's own peak
    code = ("import runpy, sys\n"
            f"sys.argv = ['clean_corpus.py', '--source', {source!r}, '--input', {str(input_path)!r}, "
            f"'--output', {str(out / 'o')!r}, '--report', {str(out / 'r.json')!r}, "
            f"'--max-record-bytes', {str(max_record_bytes)!r}]\n"
            "try:\n    runpy.run_path('tools/clean_corpus.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('RSS', next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rss = int(done.stdout.rsplit("RSS", 1)[1])
    return json.loads((out / "r.json").read_text()), rss


def test_a_gzip_bomb_inside_an_arxiv_tar_is_capped(tmp_path):
    member = io.BytesIO()
    write_gzip_bomb(member, BOMB_BYTES, prefix=b"\\documentclass{article}")
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        inputs.add_to_tar(t, "2301/2301.99999.gz", member.getvalue())
        inputs.add_to_tar(t, "2301/2301.00001.gz", gzip.compress(arxiv_paper("Fine", random.Random(5))))
    (tmp_path / "bulk.tar").write_bytes(tar.getvalue())
    assert len(tar.getvalue()) < 2 << 20  # small on disk
    report, rss_kb = clean_in_child("arxiv", tmp_path / "bulk.tar", tmp_path, CAP)
    assert rss_kb < RSS_LIMIT_KB, f"peak RSS {rss_kb} KB"
    assert report["dropped"].get("too_large") == 1 and report["output_docs"] == 1, report


def test_a_gzip_bomb_jsonl_line_is_capped(tmp_path):
    with open(tmp_path / "bomb.jsonl.gz", "wb") as f:
        write_gzip_bomb(f, BOMB_BYTES, prefix=b'{"url": "bomb", "text": "', suffix=b'"}\n')
    report, rss_kb = clean_in_child("commoncrawl", tmp_path / "bomb.jsonl.gz", tmp_path, CAP)
    assert rss_kb < RSS_LIMIT_KB, f"peak RSS {rss_kb} KB"
    assert report["dropped"] == {"too_large": 1}, report


def test_keep_rejected_keeps_the_text_of_pages_the_c4_rules_drop(tmp_path):
    rng = random.Random(6)
    good = page(rng)
    short = "Only one sentence here, which is too few for C4."
    braces = good + "\nA line with a {curly brace} in it."
    inputs.write_jsonl(str(tmp_path / "c4.jsonl"), [{"url": "g", "text": good}, {"url": "s", "text": short},
                                                   {"url": "b", "text": braces}])
    clean_corpus("c4", [str(tmp_path / "c4.jsonl")], str(tmp_path / "out"), str(tmp_path / "r.json"),
                 keep_rejected=str(tmp_path / "rej"), progress=False)
    rejected = {r["meta"]["url"]: r for r in output_rows(tmp_path / "rej")}
    assert rejected["s"]["text"] == short and rejected["s"]["meta"]["reason"] == "too_few_sentences"
    assert rejected["b"]["text"] == braces and rejected["b"]["meta"]["reason"] == "curly_brace"


def test_open_binary_reads_multi_frame_zstd_whole(tmp_path):
    frames = [zstandard.ZstdCompressor().compress(b"frame %d\n" % i * 1000) for i in range(3)]
    (tmp_path / "m.zst").write_bytes(b"".join(frames))
    with open_binary(str(tmp_path / "m.zst")) as f:
        assert f.read() == b"".join(b"frame %d\n" % i * 1000 for i in range(3))
    (tmp_path / "cut.zst").write_bytes(b"".join(frames)[:-5])
    with pytest.raises(TruncatedInput), open_binary(str(tmp_path / "cut.zst")) as f:
        f.read()
