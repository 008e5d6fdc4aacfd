"""Runs a source cleaner over input shards: parallel, resumable, with a report.

Layout of the output folder:
  NAME-00000.jsonl ...        cleaned documents, one file per input shard (written atomically)
  .clean/manifest.json        the inputs and settings of this run (a rerun must match it)
  .clean/done/NAME-i.json     completion marker of shard i, holding its counts
  .clean/work/                pass-1 documents and hashes for the global dedups (removed at the end)

Sources with a global dedup run two passes. Pass 1 (parallel) reads each shard, applies the
`pre` stages and stores the surviving documents with their hashes. One process then takes the
cross-shard dedup decisions in the global order (shard, position) — so any number of workers
gives the output of one. Pass 2 (parallel) applies them and the `post` stages.
A rerun skips shards with a completion marker and redoes any other, so output is never
duplicated and is the same as an uninterrupted run's.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from megallama.clean import dedup
from megallama.clean.document import Document, Rejected
from megallama.clean.io import dumps_line, read_json, write_json
from megallama.fileio import atomic_open
from megallama.clean.sources import Source, make_source

STATE_DIR = ".clean"


class _Shard:
    """Paths belonging to one input shard."""

    def __init__(self, index: int, path: str, source: Source, output_dir: str, rejected_dir: str | None):
        self.index, self.path = index, path
        self.name = f"{source.name}-{index:05d}"
        self.output = os.path.join(output_dir, self.name + ".jsonl")
        state = os.path.join(output_dir, STATE_DIR)
        self.done = os.path.join(state, "done", self.name + ".json")
        self.pass1 = os.path.join(state, "work", self.name + ".pass1.json")
        self.docs = os.path.join(state, "work", self.name + ".docs.pkl")
        self.hashes = os.path.join(state, "work", self.name + ".hashes.npz")
        self.rejected = os.path.join(rejected_dir, self.name) if rejected_dir else None


class _RejectedWriter:
    """Writes dropped documents (with their reason) when --keep-rejected is given; counts always."""

    def __init__(self, path: str | None):
        self.counts: Counter = Counter()
        self._ctx = atomic_open(path, "wb") if path else None
        self._f = None

    def __enter__(self) -> "_RejectedWriter":
        self._f = self._ctx.__enter__() if self._ctx else None
        return self

    def __exit__(self, *exc) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)  # on an error the partial file is removed

    def add(self, reason: str, text: str, meta: dict) -> None:
        self.counts[reason] += 1
        if self._f is not None:
            self._f.write(dumps_line({"text": text, "meta": {**meta, "reason": reason}}))


def _stage_docs(source: Source, shard: _Shard, stage: Callable[[Document], str | None],
                items: Iterable[Document | Rejected], rejected: _RejectedWriter):
    """Yield the documents of `items` that `stage` keeps; record the others."""
    for item in items:
        if isinstance(item, Rejected):
            rejected.add(item.reason, item.raw, {"source": source.name, **item.meta})
            continue
        reason = _apply(stage, item)
        if reason is None:
            yield item
        else:
            rejected.add(reason, item.text, item.meta)


def _apply(stage: Callable[[Document], str | None], doc: Document) -> str | None:
    """`stage(doc)`; a stage failing on one document drops that document, not the run."""
    try:
        return stage(doc)
    except Exception as e:  # noqa: BLE001 - counted and reported, the shard goes on
        where = doc.meta.get("id") or doc.meta.get("url")
        print(f"warning: {where}: {type(e).__name__}: {e} (document dropped as processing_error)", file=sys.stderr)
        return "processing_error"


_PROGRESS = None  # where this process reports documents done (set by _run_parallel)
_TICK = 256


def _set_progress(progress) -> None:
    global _PROGRESS
    _PROGRESS = progress


def _counted(items: Iterable, counter: Counter) -> Iterator:
    """Pass `items` through, counting them in counter["input"] and reporting progress."""
    n = 0
    for item in items:
        n += 1
        if n % _TICK == 0 and _PROGRESS is not None:
            _PROGRESS.add(_TICK)
        yield item
    counter["input"] += n
    if _PROGRESS is not None:
        _PROGRESS.add(n % _TICK)


def _guarded_read(source: Source, shard: _Shard) -> Iterator[Document | Rejected]:
    """The shard's records; if the reader fails part-way (truncated archive, corrupt compression)
    the records read so far are kept and the failure is counted as `unreadable_input`."""
    try:
        yield from source.read(shard.path)
    except Exception as e:  # noqa: BLE001 - any reader failure: count it, keep the run going
        print(f"warning: {shard.path}: stopped reading after an error: {type(e).__name__}: {e}", file=sys.stderr)
        yield Rejected("unreadable_input", f"{type(e).__name__}: {e}", {"source": source.name, "file": shard.path})


def _write_output(shard: _Shard, docs: Iterable[Document]) -> int:
    n = 0
    with atomic_open(shard.output, "wb") as f:
        for doc in docs:
            f.write(dumps_line({"text": doc.text, "meta": doc.meta}))
            n += 1
    return n


def _single_pass(source: Source, shard: _Shard) -> dict:
    """Sources without a global dedup: read, pre, post, write in one go."""
    counter = Counter()

    def both(doc):
        return source.pre(doc) or source.post(doc)

    with _RejectedWriter(shard.rejected and shard.rejected + ".jsonl") as rejected:
        kept = _write_output(shard, _stage_docs(source, shard, both, _counted(_guarded_read(source, shard), counter), rejected))
    stats = {"input_docs": counter["input"], "output_docs": kept, "dropped": dict(rejected.counts)}
    write_json(shard.done, stats)
    return stats


def _pass1(source: Source, shard: _Shard, keep_docs: bool) -> dict:
    """Read + pre stages; store survivors and their dedup hashes."""
    counter = Counter()
    with _RejectedWriter(shard.rejected and keep_docs and shard.rejected + ".pass1.jsonl") as rejected:
        docs = [(d.text, d.meta) for d in _stage_docs(source, shard, source.pre,
                                                       _counted(_guarded_read(source, shard), counter), rejected)]
    arrays = {}
    if source.exact_dedup:
        arrays["doc_hash"] = np.array([dedup.hash64(source.dedup_key(Document(t, m))) for t, m in docs], dtype=np.uint64)
    if source.line_dedup:
        per_doc = [dedup.line_hashes(t) for t, _ in docs]
        arrays["line_hash"] = np.concatenate(per_doc) if per_doc else np.zeros(0, dtype=np.uint64)
        arrays["line_offsets"] = np.cumsum([0] + [len(h) for h in per_doc]).astype(np.int64)
    if source.near_dedup_threshold is not None:
        sigs = [dedup.minhash_signature(t) for t, _ in docs]
        arrays["minhash"] = np.stack(sigs) if sigs else np.zeros((0, 128), dtype=np.uint32)
    with atomic_open(shard.hashes, "wb") as f:
        np.savez(f, **arrays)
    if keep_docs:
        with atomic_open(shard.docs, "wb") as f:
            pickle.dump(docs, f, protocol=pickle.HIGHEST_PROTOCOL)
    stats = {"input_docs": counter["input"], "kept": len(docs), "dropped": dict(rejected.counts)}
    write_json(shard.pass1, stats)
    return stats


def _pass2(source: Source, shard: _Shard, exact_dup: np.ndarray | None, near_dup: np.ndarray | None,
           earlier_lines: np.ndarray | None) -> dict:
    """Apply the global dedup decisions and the post stages; write the shard's output."""
    with open(shard.docs, "rb") as f:
        docs = pickle.load(f)
    stored = np.load(shard.hashes)
    keep_line = dedup.keep_first_lines(stored["line_hash"], earlier_lines) if source.line_dedup else None
    offsets = stored["line_offsets"] if source.line_dedup else None
    def kept_docs(rejected: _RejectedWriter):
        for j, (text, meta) in enumerate(_counted(docs, Counter())):
            if exact_dup is not None and exact_dup[j]:
                rejected.add("duplicate", text, meta)
                continue
            if near_dup is not None and near_dup[j]:
                rejected.add("near_duplicate", text, meta)
                continue
            removed = 0
            if keep_line is not None:
                mask = keep_line[offsets[j]:offsets[j + 1]]
                if not mask.all():
                    text = "\n".join(line for line, k in zip(text.split("\n"), mask.tolist()) if k)
                    removed = len(mask) - int(mask.sum())
            doc = Document(text, meta, lines_removed=removed)
            reason = _apply(source.post, doc)
            if reason is None:
                yield doc
            else:
                rejected.add(reason, doc.text, doc.meta)

    with _RejectedWriter(shard.rejected and shard.rejected + ".pass2.jsonl") as rejected:
        kept = _write_output(shard, kept_docs(rejected))
    first = read_json(shard.pass1)
    dropped = Counter(first["dropped"]) + rejected.counts
    stats = {"input_docs": first["input_docs"], "output_docs": kept, "dropped": dict(dropped)}
    write_json(shard.done, stats)
    os.unlink(shard.docs)
    return stats


class _SharedProgress:
    """Documents done, summed over worker processes; the main process polls `done`."""

    def __init__(self, ctx) -> None:
        self._value = ctx.Value("q", 0)

    def add(self, n: int) -> None:
        with self._value.get_lock():
            self._value.value += n

    @property
    def done(self) -> int:
        return self._value.value


class _BarProgress:
    """In-process work: documents done go straight to the bar."""

    def __init__(self, bar) -> None:
        self.bar = bar

    def add(self, n: int) -> None:
        self.bar.update(n)


def _run_parallel(fn, tasks: list[tuple], workers: int, desc: str, progress: bool) -> list[dict]:
    """Run fn(*task) for each task on `workers` processes, with a progress bar over documents."""
    results: list[dict] = []
    totals = Counter()
    bar = tqdm(desc=desc, unit="doc", disable=not progress or not tasks, mininterval=0.5)

    def done(stats):
        results.append(stats)
        totals["kept"] += stats.get("output_docs", stats.get("kept", 0))
        bar.set_postfix(shards=f"{len(results)}/{len(tasks)}", kept=totals["kept"], refresh=False)

    if workers <= 1 or len(tasks) <= 1:
        _set_progress(_BarProgress(bar))
        try:
            for task in tasks:
                done(fn(*task))
        finally:
            _set_progress(None)
    else:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        shared = _SharedProgress(ctx)
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_set_progress, initargs=(shared,)) as pool:
            pending = {pool.submit(fn, *task) for task in tasks}
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in finished:
                    done(fut.result())
                bar.update(shared.done - bar.n)
    bar.close()
    return results


def _global_decisions(source: Source, shards: list[_Shard]):
    """Cross-shard dedup decisions, in global order, from the stored pass-1 hashes."""
    stored = [np.load(s.hashes) for s in shards]
    exact = dedup.exact_duplicates([a["doc_hash"] for a in stored]) if source.exact_dedup else None
    near = None
    if source.near_dedup_threshold is not None:
        near = dedup.near_duplicates([a["minhash"] for a in stored], source.near_dedup_threshold, skip=exact)
    earlier = None
    if source.line_dedup:
        earlier = dedup.earlier_shard_lines([dedup.shard_line_hashes(a["line_hash"]) for a in stored])
    return exact, near, earlier


def _check_manifest(path: str, manifest: dict) -> None:
    if os.path.exists(path):
        old = read_json(path)
        if old != manifest:
            raise RuntimeError(
                f"{os.path.dirname(os.path.dirname(path))} holds the output of a different run "
                f"(other inputs or settings, see {path}); use a new --output folder or delete it")
    else:
        write_json(path, manifest)


def clean_corpus(source: str | Source, inputs: list[str], output_dir: str, report_path: str, *,
                 workers: int = 1, keep_rejected: str | None = None, quality_model: str | None = None,
                 progress: bool = True) -> dict:
    """Clean `inputs` with `source` (a name from SOURCES or a Source) into JSONL files in
    `output_dir`; write and return the report {input_docs, output_docs, dropped{reason: n}}."""
    if isinstance(source, str):
        source = make_source(source, quality_model=quality_model)
    elif quality_model is not None:
        raise ValueError("pass quality_model to the Source itself when giving a Source object")
    paths = source.shards(inputs)
    if not paths:
        raise FileNotFoundError(f"no {source.name} input files found in {list(inputs)} (looked for {source.extensions})")
    os.makedirs(output_dir, exist_ok=True)
    manifest = {"settings": source.settings(),
                "shards": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p) if os.path.isfile(p) else None}
                           for p in paths]}
    _check_manifest(os.path.join(output_dir, STATE_DIR, "manifest.json"), manifest)
    shards = [_Shard(i, p, source, output_dir, keep_rejected) for i, p in enumerate(paths)]
    todo = [s for s in shards if not os.path.exists(s.done)]
    if todo:
        source.warm_up()
        if source.line_dedup:
            dedup.warm_up()

    if todo and not source.global_dedup:
        _run_parallel(_single_pass, [(source, s) for s in todo], workers, f"clean {source.name}", progress)
    elif todo:
        pending = {s.index for s in todo}
        need_pass1 = [s for s in shards if not (os.path.exists(s.pass1) and os.path.exists(s.hashes)
                                                and (s.index not in pending or os.path.exists(s.docs)))]
        _run_parallel(_pass1, [(source, s, s.index in pending) for s in need_pass1], workers,
                      f"read {source.name}", progress)
        exact, near, earlier = _global_decisions(source, shards)
        tasks = [(source, s, exact[s.index] if exact else None, near[s.index] if near else None,
                  earlier[s.index] if earlier else None) for s in todo]
        _run_parallel(_pass2, tasks, workers, f"clean {source.name}", progress)

    per_shard = [read_json(s.done) for s in shards]
    dropped = Counter()
    for stats in per_shard:
        dropped.update(stats["dropped"])
    report = {"source": source.name, "shards": len(shards),
              "input_docs": sum(s["input_docs"] for s in per_shard),
              "output_docs": sum(s["output_docs"] for s in per_shard),
              "dropped": dict(sorted(dropped.items()))}
    assert report["input_docs"] == report["output_docs"] + sum(dropped.values()), report
    write_json(report_path, report)
    shutil.rmtree(os.path.join(output_dir, STATE_DIR, "work"), ignore_errors=True)
    return report
