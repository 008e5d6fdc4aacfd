"""Runs a source cleaner over input shards on an executor (local processes or Ray): resumable,
with a report.

Layout of the output folder:
  NAME-00000.jsonl ...        cleaned documents, one file per input shard (written atomically)
  .clean/manifest.json        the inputs and settings of this run (a rerun must match it)
  .clean/done/NAME-i.json     completion marker of shard i, holding its counts
  .clean/work/                pass-1 documents (JSONL) and hashes (.npy), dedup decisions; removed
                              at the end. Nothing here is ever unpickled: a planted file can at
                              worst make a rerun fail, never run code.

Sources with a global dedup run in three steps. Pass 1 (one task per shard) reads the shard,
applies the `pre` stages and stores the surviving documents with their hashes, grouped by hash
partition. The dedup step (one task per partition and dedup kind) takes the cross-shard decisions
for the hashes of its partition in the global order (shard, position); no task holds every hash.
Pass 2 (one task per shard) applies the decisions and the `post` stages. So any executor, number
of workers or of partitions gives the output of one local worker.
A rerun skips shards with a completion marker and redoes any other, so output is never
duplicated and is the same as an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
from collections import Counter
from typing import Callable, Iterable, Iterator

import numpy as np

from megallama.clean import dedup
from megallama.clean.document import Document, Rejected
from megallama.clean.io import dumps_line, loads, read_json, write_json
from megallama.clean.sources import Source, make_source
from megallama.executors import Executor, LocalExecutor, report_progress
from megallama.fileio import atomic_open, make_folder

STATE_DIR = ".clean"
PARTITION_INPUT_BYTES = 1 << 30  # input bytes per dedup partition when --dedup-partitions is not given


class _Shard:
    """Paths belonging to one input shard."""

    def __init__(self, index: int, path: str, source: Source, output_dir: str, rejected_dir: str | None):
        self.index, self.path = index, path
        self.name = f"{source.name}-{index:05d}"
        self.output = os.path.join(output_dir, self.name + ".jsonl")
        state = os.path.join(output_dir, STATE_DIR)
        self.done = os.path.join(state, "done", self.name + ".json")
        self.pass1 = os.path.join(state, "work", self.name + ".pass1.json")
        self.docs = os.path.join(state, "work", self.name + ".docs.jsonl")
        self.work = os.path.join(state, "work", self.name)  # prefix of the shard's .npy hash files
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


_TICK = 256


def _counted(items: Iterable, counter: Counter) -> Iterator:
    """Pass `items` through, counting them in counter["input"] and reporting progress."""
    n = 0
    for item in items:
        n += 1
        if n % _TICK == 0:
            report_progress(_TICK)
        yield item
    counter["input"] += n
    report_progress(n % _TICK)


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


def _save_npy(path: str, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def _save_grouped(prefix: str, values: np.ndarray, offsets: np.ndarray) -> None:
    """`values` in groups (partitions or shards) with their offsets; the offsets file, written
    last, marks the pair complete."""
    _save_npy(prefix + ".npy", values)
    _save_npy(prefix + ".offsets.npy", offsets)


def _load_npy(path: str, mmap: bool = False) -> np.ndarray:
    """A stored array; never an object array (unpickling a planted file would run its code)."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: not an array this run wrote ({e}); delete {os.path.dirname(path)} "
                         "to redo the unfinished shards") from None


def _load_group(prefix: str, group: int) -> np.ndarray:
    """One group of a file written by _save_grouped, read through a memory map (only that group
    is read from disk)."""
    offsets = _load_npy(prefix + ".offsets.npy")
    values = _load_npy(prefix + ".npy", mmap=True)
    return np.array(values[offsets[group]:offsets[group + 1]])


def _concat_groups(parts: list[np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
    return (np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)), offsets


def _pass1(source: Source, shard: _Shard, keep_docs: bool, partitions: int) -> dict:
    """Read + pre stages; store survivors (JSONL) and their dedup hashes, grouped by partition."""
    counter = Counter()
    doc_hashes, line_hashes, signatures = [], [], []
    kept = 0
    docs_file = atomic_open(shard.docs, "wb") if keep_docs else contextlib.nullcontext()
    with _RejectedWriter(shard.rejected and keep_docs and shard.rejected + ".pass1.jsonl") as rejected, \
            docs_file as docs_out:
        for doc in _stage_docs(source, shard, source.pre, _counted(_guarded_read(source, shard), counter), rejected):
            kept += 1
            if docs_out is not None:
                docs_out.write(dumps_line({"text": doc.text, "meta": doc.meta}))
            if source.exact_dedup:
                doc_hashes.append(dedup.hash64(source.dedup_key(doc)))
            if source.line_dedup:
                line_hashes.append(dedup.line_hashes(doc.text))
            if source.near_dedup_threshold is not None:
                signatures.append(dedup.minhash_signature(doc.text))
    if source.exact_dedup:
        entries = np.zeros(len(doc_hashes), dtype=dedup.EXACT_ENTRY)
        entries["hash"], entries["pos"] = doc_hashes, np.arange(len(doc_hashes))
        _save_grouped(shard.work + ".exact", *dedup.split_by_partition(entries, entries["hash"], partitions))
    if source.line_dedup:
        flat, offsets = _concat_groups(line_hashes, np.uint64)
        _save_grouped(shard.work + ".lines", flat, offsets)
        unique = dedup.shard_line_hashes(flat)
        _save_grouped(shard.work + ".line_set", *dedup.split_by_partition(unique, unique, partitions))
    if source.near_dedup_threshold is not None:
        sigs = np.stack(signatures).astype(np.uint64) if signatures else np.zeros((0, dedup.NUM_PERM), dtype=np.uint64)
        _save_npy(shard.work + ".minhash.npy", sigs)
        bands, rows = dedup.lsh_bands(source.near_dedup_threshold, sigs.shape[1])
        keys = dedup.band_keys(sigs, bands, rows)
        entries = np.zeros(keys.size, dtype=dedup.BAND_ENTRY)
        entries["key"], entries["pos"] = keys.ravel(), np.repeat(np.arange(len(sigs)), bands)
        _save_grouped(shard.work + ".bands", *dedup.split_by_partition(entries, entries["key"], partitions))
    stats = {"input_docs": counter["input"], "kept": kept,
             "dropped": dict(rejected.counts), "partitions": partitions}
    write_json(shard.pass1, stats)
    return stats


def _dedup_partition(kind: str, partition: int, shard_work: list[str], out_prefix: str,
                     threshold: float | None = None) -> dict:
    """The cross-shard decisions of one dedup `kind` for the hashes of one partition, from every
    shard's entries in that partition (and nothing else)."""
    if kind == "near":
        signatures: dict[int, np.ndarray] = {}

        def signature(s: int, pos: int) -> np.ndarray:
            if s not in signatures:
                signatures[s] = _load_npy(shard_work[s] + ".minhash.npy", mmap=True)
            return np.array(signatures[s][pos])

        per_shard = [_load_group(w + ".bands", partition) for w in shard_work]
        num_perm = _load_npy(shard_work[0] + ".minhash.npy", mmap=True).shape[1]
        bands, rows = dedup.lsh_bands(threshold, num_perm)
        pairs = dedup.near_partition(per_shard, signature, threshold, bands, rows)
        _save_npy(out_prefix + ".npy", pairs)
        result = {"kind": kind, "partition": partition, "pairs": len(pairs)}
    else:
        if kind == "exact":
            found = dedup.exact_partition([_load_group(w + ".exact", partition) for w in shard_work])
            values, offsets = _concat_groups(found, np.int64)
        else:
            found = dedup.line_partition([_load_group(w + ".line_set", partition) for w in shard_work])
            values, offsets = _concat_groups(found, np.uint64)
        _save_grouped(out_prefix, values, offsets)
        result = {"kind": kind, "partition": partition, "entries": int(offsets[-1])}
    report_progress(1)  # the dedup bar counts partitions: its tasks see hashes, not documents
    return result


def _exact_dups(dedup_dir: str, partitions: int, shard: int) -> np.ndarray:
    return np.concatenate([_load_group(os.path.join(dedup_dir, f"exact-{p:05d}"), shard) for p in range(partitions)])


def _near_decisions(dedup_dir: str, partitions: int, shards: int, exact: bool) -> None:
    """Near duplicates from the partitions' pairs (few: only documents that have a close copy);
    per shard, in dedup_dir/near.npy."""
    pairs = np.concatenate([_load_npy(os.path.join(dedup_dir, f"near-{p:05d}.npy")).reshape(-1, 2)
                            for p in range(partitions)])

    def skipped(gids: np.ndarray) -> np.ndarray:
        if not exact:
            return np.zeros(len(gids), dtype=bool)
        shard_of = gids >> dedup.GID_SHIFT
        dups = np.concatenate([(np.int64(s) << dedup.GID_SHIFT) | _exact_dups(dedup_dir, partitions, s)
                               for s in np.unique(shard_of).tolist()])
        return np.isin(gids, dups)

    dup = dedup.near_decisions(pairs, skipped)
    shard_of, pos = dup >> dedup.GID_SHIFT, dup & ((1 << dedup.GID_SHIFT) - 1)
    _save_grouped(os.path.join(dedup_dir, "near"), *_concat_groups([pos[shard_of == s] for s in range(shards)], np.int64))


def _pass2(source: Source, shard: _Shard, dedup_dir: str, partitions: int) -> dict:
    """Apply the global dedup decisions and the post stages; write the shard's output."""
    n_docs = read_json(shard.pass1)["kept"]
    exact_dup = near_dup = keep_line = offsets = None
    if source.exact_dedup:
        exact_dup = np.zeros(n_docs, dtype=bool)
        exact_dup[_exact_dups(dedup_dir, partitions, shard.index)] = True
    if source.near_dedup_threshold is not None:
        near_dup = np.zeros(n_docs, dtype=bool)
        near_dup[_load_group(os.path.join(dedup_dir, "near"), shard.index)] = True
    if source.line_dedup:
        earlier = np.concatenate([_load_group(os.path.join(dedup_dir, f"lines-{p:05d}"), shard.index)
                                  for p in range(partitions)])
        flat = _load_npy(shard.work + ".lines.npy")
        offsets = _load_npy(shard.work + ".lines.offsets.npy")
        keep_line = dedup.keep_first_lines(flat, earlier)

    def stored_docs() -> Iterator[tuple[str, dict]]:
        with open(shard.docs, "rb") as f:
            for line in f:
                doc = loads(line)
                yield doc["text"], doc["meta"]

    def kept_docs(rejected: _RejectedWriter):
        for j, (text, meta) in enumerate(_counted(stored_docs(), Counter())):
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


def _global_dedup(source: Source, shards: list[_Shard], partitions: int, executor: Executor, progress: bool) -> str:
    """Run the dedup step's partition tasks; returns the folder holding their decisions."""
    dedup_dir = os.path.join(os.path.dirname(shards[0].pass1), "dedup")
    os.makedirs(dedup_dir, exist_ok=True)
    work = [s.work for s in shards]
    kinds = [k for k, on in (("exact", source.exact_dedup), ("lines", source.line_dedup),
                             ("near", source.near_dedup_threshold is not None)) if on]
    tasks = [(kind, p, work, os.path.join(dedup_dir, f"{kind}-{p:05d}"), source.near_dedup_threshold)
             for kind in kinds for p in range(partitions)]
    executor.run(_dedup_partition, tasks, f"dedup {source.name}", progress, unit="partition")
    if source.near_dedup_threshold is not None:
        _near_decisions(dedup_dir, partitions, len(shards), source.exact_dedup)
    return dedup_dir


def dedup_partitions_for(paths: list[str], bytes_per_partition: int = PARTITION_INPUT_BYTES) -> int:
    """Partitions for a corpus: one per `bytes_per_partition` of input, so a partition task's
    memory stays the same whatever the corpus size."""
    total = sum(os.path.getsize(p) for p in paths if os.path.isfile(p))
    return max(1, math.ceil(total / bytes_per_partition))


def _make_destinations(output_dir: str, report_path: str, keep_rejected: str | None) -> None:
    """Create the output folders, and refuse destinations that cannot be written, before any work
    (the report is written only at the end of the run)."""
    if os.path.isdir(report_path):
        raise ValueError(f"--report {report_path} is a folder; name a file such as {os.path.join(report_path, 'report.json')}")
    report_dir = os.path.dirname(os.path.abspath(report_path))
    for flag, folder in (("--report", report_dir), ("--keep-rejected", keep_rejected), ("--output", output_dir)):
        if folder is not None:
            make_folder(folder, flag)


def _check_manifest(path: str, manifest: dict) -> None:
    if os.path.exists(path):
        old = read_json(path)
        if old != manifest:
            raise RuntimeError(
                f"{os.path.dirname(os.path.dirname(path))} holds the output of a different run "
                f"(other inputs or settings, see {path}); use a new --output folder or delete it")
    else:
        write_json(path, manifest)


def _pass1_done(shard: _Shard, partitions: int, need_docs: bool) -> bool:
    """Pass 1 of `shard` finished (its stats are written last) with this partitioning, and its
    documents are still there if pass 2 needs them."""
    if not os.path.exists(shard.pass1) or read_json(shard.pass1).get("partitions") != partitions:
        return False
    return not need_docs or os.path.exists(shard.docs)


def clean_corpus(source: str | Source, inputs: list[str], output_dir: str, report_path: str, *,
                 workers: int = 1, executor: Executor | None = None, dedup_partitions: int | None = None,
                 keep_rejected: str | None = None, quality_model: str | None = None,
                 progress: bool = True) -> dict:
    """Clean `inputs` with `source` (a name from SOURCES or a Source) into JSONL files in
    `output_dir`; write and return the report {shards, shards_without_documents, input_docs,
    output_docs, dropped{reason: n}}.
    Tasks run on `executor` (default: a local pool of `workers` processes); cross-shard dedup
    uses `dedup_partitions` hash partitions (default: from the input size)."""
    if isinstance(source, str):
        source = make_source(source, quality_model=quality_model)
    elif quality_model is not None:
        raise ValueError("pass quality_model to the Source itself when giving a Source object")
    if dedup_partitions is not None and dedup_partitions < 1:
        raise ValueError(f"dedup_partitions must be at least 1, got {dedup_partitions}")
    paths = source.shards(inputs)
    if not paths:
        raise FileNotFoundError(f"no {source.name} input files found in {list(inputs)} (looked for {source.extensions})")
    _make_destinations(output_dir, report_path, keep_rejected)
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
        with contextlib.ExitStack() as stack:
            if executor is None:
                executor = stack.enter_context(LocalExecutor(workers))
            _clean_shards(source, shards, todo, dedup_partitions or dedup_partitions_for(paths), executor, progress)

    per_shard = [read_json(s.done) for s in shards]
    dropped = Counter()
    for stats in per_shard:
        dropped.update(stats["dropped"])
    # a warning, not an error: a genuinely empty shard can happen; a file of another format is the usual cause
    empty = [s.path for s, stats in zip(shards, per_shard) if not stats["input_docs"]
             and os.path.isfile(s.path) and os.path.getsize(s.path)]
    for path in empty:
        print(f"warning: {path}: no {source.name} document in this non-empty file; expected {source.input_format}",
              file=sys.stderr)
    report = {"source": source.name, "shards": len(shards), "shards_without_documents": len(empty),
              "input_docs": sum(s["input_docs"] for s in per_shard),
              "output_docs": sum(s["output_docs"] for s in per_shard),
              "dropped": dict(sorted(dropped.items()))}
    assert report["input_docs"] == report["output_docs"] + sum(dropped.values()), report
    write_json(report_path, report)
    shutil.rmtree(os.path.join(output_dir, STATE_DIR, "work"), ignore_errors=True)
    return report


def _clean_shards(source: Source, shards: list[_Shard], todo: list[_Shard], partitions: int,
                  executor: Executor, progress: bool) -> None:
    if not source.global_dedup:
        executor.run(_single_pass, [(source, s) for s in todo], f"clean {source.name}", progress)
        return
    pending = {s.index for s in todo}
    need_pass1 = [s for s in shards if not _pass1_done(s, partitions, s.index in pending)]
    executor.run(_pass1, [(source, s, s.index in pending, partitions) for s in need_pass1],
                 f"read {source.name}", progress)
    dedup_dir = _global_dedup(source, shards, partitions, executor, progress)
    executor.run(_pass2, [(source, s, dedup_dir, partitions) for s in todo], f"clean {source.name}", progress)
