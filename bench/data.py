#!/usr/bin/env python
"""Data benchmarks, each a ratio against its peer measured in the same run (sides alternated):

1. indexed dataset write and random-read throughput vs megatron-core's IndexedDataset(Builder);
2. GPT sample-index and blending-index build time vs megatron-core's helpers_cpp;
3. tools/preprocess_data.py docs/s and MB/s at 1 and 2 workers vs SentencePiece's own batch
   encode (``encode(list, num_threads=2)``, texts already in memory) on a >= 20 MB corpus, and a
   check that every id written equals SentencePiece's.

The corpus is built from text on this machine (Python's standard library sources, pydoc topics,
manual pages, package documentation, Debian changelogs: 80% prose, 20% code), no downloads.  Ratios > 1 mean megallama is faster.
"""
import argparse
import glob
import gzip
import json
import os
import resource
import sys
import sysconfig
import tempfile
import time

import numpy as np
import torch

from benchlib import add_json_flag, ratio_row, write_json
from megallama.data.index_builders import build_blending_indices, build_sample_idx
from megallama.data.indexed import IndexedDataset, IndexedDatasetWriter
from megallama.data.preprocess import preprocess
from megallama.tokenizer import SentencePieceTokenizer, train_sentencepiece


def alternate(ours, theirs, rounds, number=1, clock=time.process_time):
    """Min time of each side over ``rounds``, alternating (and swapping which goes first) so both
    see the same machine load; ``number`` calls per timing for calls too short to time alone.
    Both sides here are single-threaded, so CPU time is the default clock: on a shared machine it
    is far steadier than wall time."""
    t_ours, t_theirs = [], []
    for r in range(rounds):
        sides = ((ours, t_ours), (theirs, t_theirs))
        for fn, acc in sides if r % 2 == 0 else sides[::-1]:
            t = clock()
            for _ in range(number):
                fn()
            acc.append((clock() - t) / number)
    return min(t_ours), min(t_theirs)


ROWS: list = []
DETAILS: dict = {}


def report(name, ours, theirs, peer, target=""):
    """Print one timing pair and keep it as a row of the README's performance table."""
    print(f"{name:<58} ours {ours * 1e3:9.2f} ms  peer {theirs * 1e3:9.2f} ms (CPU)  speedup x{theirs / ours:5.2f}")
    ROWS.append(ratio_row("data", f"{name} (speedup)", peer, theirs / ours, target))
    DETAILS[name] = {"ours_s": ours, "peer_s": theirs}


def bench_indexed(workdir, rounds):
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MCDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, size=50_000)
    flat = rng.integers(0, 32000, size=int(lengths.sum())).astype(np.uint16)
    docs = np.split(flat, np.cumsum(lengths)[:-1])
    tensors = [torch.from_numpy(d) for d in docs]
    ours_prefix, mc_prefix = os.path.join(workdir, "ours"), os.path.join(workdir, "mc")

    def write_ours():
        with IndexedDatasetWriter(ours_prefix, np.uint16) as w:
            for d in docs:
                w.add_document(d)

    def write_mc():
        b = IndexedDatasetBuilder(mc_prefix + ".bin", dtype=np.uint16)
        for t in tensors:
            b.add_item(t)
            b.end_document()
        b.finalize(mc_prefix + ".idx")

    t_o, t_m = alternate(write_ours, write_mc, rounds)
    mb = flat.nbytes / 1e6
    print(f"-- indexed dataset: {len(docs):,} documents, {flat.size / 1e6:.1f}M tokens ({mb:.0f} MB)")
    report(f"indexed write {mb:.0f} MB, one document per call", t_o, t_m, "megatron-core IndexedDatasetBuilder")
    ours_ds, mc_ds = IndexedDataset(ours_prefix), MCDataset(mc_prefix)
    picks = rng.integers(0, len(docs), size=100_000)

    # Reads are zero-copy views on both sides; results are dropped at once, since keeping 100k
    # arrays alive would time the allocator rather than the reader.
    def read(ds):
        def run():
            for i in picks:
                ds[int(i)]
        return run

    def read_part(get):
        def run():
            for i, o, n in offsets:
                get(i, o, n)
        return run

    t_o, t_m = alternate(read(ours_ds), read(mc_ds), 2 * rounds)
    report(f"indexed random read of {len(picks):,} sequences", t_o, t_m, "megatron-core IndexedDataset")
    offsets = [(int(i), int(lengths[i]) // 3, int(lengths[i]) // 3) for i in picks]
    t_o, t_m = alternate(read_part(ours_ds.get), read_part(mc_ds.get), 2 * rounds)
    report(f"indexed random partial read x{len(picks):,}", t_o, t_m, "megatron-core IndexedDataset")


def bench_index_builders(rounds):
    from megatron.core.datasets import helpers_cpp

    rng = np.random.default_rng(1)
    print("-- index builders (megatron-core helpers_cpp as peer)")
    for n_docs, epochs, seq in [(20_000, 1, 2048), (2_000_000, 2, 2048), (2_000_000, 2, 128)]:
        sizes = rng.integers(1, 1000, size=n_docs).astype(np.int32)
        doc_idx = np.tile(np.arange(n_docs, dtype=np.int32), epochs)
        rng.shuffle(doc_idx)
        tpe = int(sizes.sum())
        ours = build_sample_idx(sizes, doc_idx, seq, epochs, tpe)
        theirs = helpers_cpp.build_sample_idx_int32(sizes, doc_idx, seq, epochs, tpe, True, 1)
        assert np.array_equal(ours, theirs), "sample index differs from megatron-core's"
        t_o, t_m = alternate(lambda: build_sample_idx(sizes, doc_idx, seq, epochs, tpe),
                             lambda: helpers_cpp.build_sample_idx_int32(sizes, doc_idx, seq, epochs, tpe, True, 1),
                             rounds + 2, number=max(1, 2_000_000 // n_docs))
        report(f"sample index, {epochs * tpe / 1e6:,.0f}M tokens, seq {seq}", t_o, t_m, "megatron-core helpers_cpp", "≥ 1")
    weights = np.array([67.0, 15.0, 4.5, 4.5, 4.5, 2.5, 2.0]) / 100
    for size in (1_000_000, 20_000_000):
        def theirs():
            di, si = np.empty(size, np.int16), np.empty(size, np.int64)
            helpers_cpp.build_blending_indices(di, si, weights, len(weights), size, False)
            return di, si

        assert all(np.array_equal(a, b) for a, b in zip(build_blending_indices(weights, size), theirs()))
        t_o, t_m = alternate(lambda: build_blending_indices(weights, size), theirs, rounds + 2)
        report(f"blending index, LLaMA's 7 sources, {size / 1e6:.0f}M samples", t_o, t_m, "megatron-core helpers_cpp", "≥ 1")


def _machine_texts():
    """(kind, text) from this machine: manual pages (several languages), vim and package
    documentation, pydoc topics, Debian changelogs, and Python's standard library."""
    import pydoc_data.topics

    for key in sorted(pydoc_data.topics.topics):
        yield "prose", pydoc_data.topics.topics[key]
    for name in sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt")):
        yield "prose", open(name, errors="replace").read()
    for name in sorted(glob.glob("/usr/share/man/**/*.gz", recursive=True)):
        try:
            raw = gzip.open(name, "rt", errors="replace").read()
        except OSError:
            continue
        # drop troff requests and font escapes, keep the running text
        lines = [line.replace("\\fB", "").replace("\\fI", "").replace("\\fR", "").replace("\\fP", "").replace("\\-", "-")
                 for line in raw.split("\n") if not line.startswith((".", "'"))]
        yield "prose", "\n".join(lines)
    for pattern in ["/usr/share/doc/**/*.md", "/usr/share/doc/**/*.txt", sysconfig.get_paths()["purelib"] + "/**/*.rst",
                    sysconfig.get_paths()["purelib"] + "/**/*.md"]:
        for name in sorted(glob.glob(pattern, recursive=True)):
            yield "prose", open(name, errors="replace").read()
    for name in sorted(glob.glob("/usr/share/doc/*/changelog*.gz")):
        try:
            yield "prose", gzip.open(name, "rt", errors="replace").read()
        except OSError:
            continue
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        if "site-packages" not in name:
            yield "code", open(name, errors="replace").read()


def build_corpus(path, target_mb, code_share=0.2):
    """JSONL documents of up to 40 lines, ~``code_share`` code and the rest prose, shuffled."""
    if os.path.exists(path):
        return
    budget = {"prose": target_mb * 1e6 * (1 - code_share), "code": target_mb * 1e6 * code_share}
    docs = []
    for kind, text in _machine_texts():
        if budget[kind] <= 0:
            if all(b <= 0 for b in budget.values()):
                break
            continue
        lines = text.split("\n")
        for i in range(0, len(lines), 40):
            doc = "\n".join(lines[i:i + 40]).strip("\n")
            if doc.strip():
                docs.append(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                budget[kind] -= len(docs[-1].encode())
    if any(b > 0 for b in budget.values()):
        raise SystemExit(f"not enough text on this machine for a {target_mb} MB corpus (short by {budget})")
    np.random.default_rng(0).shuffle(docs)
    with open(path + ".tmp", "w") as out:
        out.writelines(docs)
    os.replace(path + ".tmp", path)


def bench_preprocess(workdir, corpus_mb, vocab_size, rounds):
    corpus = os.path.join(workdir, f"corpus_{corpus_mb}mb.jsonl")
    build_corpus(corpus, corpus_mb)
    texts = [json.loads(line)["text"] for line in open(corpus)]
    nbytes = os.path.getsize(corpus)
    model = os.path.join(workdir, f"tok{vocab_size}.model")
    if not os.path.exists(model):
        sample = [line for t in texts[::7] for line in t.split("\n") if line.strip()]
        train_sentencepiece(sample, vocab_size, model[:-len(".model")], input_sentence_size=200_000, num_threads=2)
    tok = SentencePieceTokenizer(model)
    print(f"-- preprocess: {len(texts):,} documents, {nbytes / 1e6:.1f} MB JSONL, vocab {vocab_size} "
          f"(chunk cache {'on' if tok.supports_chunk_cache else 'off'})")

    def sp_encode():
        return tok.sp.encode(texts, num_threads=2)

    out = os.path.join(workdir, "pre")
    sp_name = "sentencepiece encode(list, num_threads=2)"
    names = [sp_name, "preprocess_data.py --workers 1", "preprocess_data.py --workers 2"]
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            c0, t0 = cpu_seconds(), time.perf_counter()
            if name == sp_name:
                ids = sp_encode()
                # kept compact: millions of int objects would make every forked worker slow
                reference = (np.fromiter((t for i in ids for t in i), dtype=np.int32),
                             np.array([len(i) for i in ids], dtype=np.int64))
                del ids
            else:
                preprocess([corpus], out, tokenizer_model=model, append_eod=False, workers=int(name[-1]), progress=False)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(cpu_seconds() - c0)
    ds = IndexedDataset(out + "_text_document")
    ref_flat, ref_counts = reference
    assert len(ds) == len(ref_counts)
    starts = np.concatenate([[0], np.cumsum(ref_counts)[:-1]])
    mismatched = sum(not np.array_equal(ds[i], ref_flat[s:s + n]) for i, (s, n) in enumerate(zip(starts, ref_counts)))
    print(f"ids identical to SentencePiece's: {len(ds) - mismatched:,}/{len(ds):,} documents "
          f"({ds.num_tokens:,} tokens)")
    if mismatched:
        raise SystemExit(f"{mismatched} documents differ from SentencePiece's ids")
    base, base_cpu = min(wall[sp_name]), min(cpu[sp_name])
    for name in names:
        t, c = min(wall[name]), min(cpu[name])
        print(f"{name:<45} {len(texts) / t:9,.0f} docs/s {nbytes / 1e6 / t:7.2f} MB/s  x{base / t:5.2f} | "
              f"CPU {c:6.2f} s  x{base_cpu / c:5.2f} per core-second")
        DETAILS[name] = {"docs_per_s": len(texts) / t, "mb_per_s": nbytes / 1e6 / t, "cpu_s": c}
        if name != sp_name:
            ROWS.append(ratio_row("data", f"{name}: docs/s on {nbytes / 1e6:.0f} MB, ids identical",
                                  sp_name, base / t, "≥ 1.5"))
            ROWS.append(ratio_row("data", f"{name}: documents per CPU-second", sp_name, base_cpu / c))


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its finished children (the workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "megallama_bench_data"),
                   help="where the corpus, tokenizer and outputs go (kept between runs)")
    p.add_argument("--corpus-mb", type=int, default=24, help="size of the preprocessing corpus (>= 20 per the issue)")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of the benchmark tokenizer")
    p.add_argument("--rounds", type=int, default=3, help="repetitions per side (the minimum is reported)")
    p.add_argument("--only", choices=["indexed", "builders", "preprocess"], nargs="*", help="run only these parts")
    add_json_flag(p)
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    parts = args.only or ["indexed", "builders", "preprocess"]
    if "indexed" in parts:
        bench_indexed(args.workdir, args.rounds)
    if "builders" in parts:
        bench_index_builders(args.rounds)
    if "preprocess" in parts:
        bench_preprocess(args.workdir, args.corpus_mb, args.vocab_size, args.rounds)
    write_json(args.json, ROWS, DETAILS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
