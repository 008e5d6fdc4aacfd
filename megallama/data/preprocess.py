"""JSONL → Megatron ``.bin/.idx``, streamed with bounded memory (what tools/preprocess_data.py runs).

The reader hands batches of raw lines to worker processes (at most two batches per worker in
flight, so memory does not grow with the input); workers parse, tokenize with the chunk-cached
batch encoder and return flat id arrays; results are written in input order. Outputs are
``PREFIX_{key}_document.bin/.idx``, renamed into place only when complete.

With an executor (``--executor ray``) each input file is a task — a one-file run of the above on
a cluster worker, into ``PREFIX.shards/NNNNN`` — and the shards are then merged in input order
into the same outputs, byte for byte, as the local run's.
"""
from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from tqdm import tqdm

from megallama.compressed import strip_compression
from megallama.data.indexed import IndexedDatasetWriter, as_token_dtype, merge_indexed_datasets, optimal_dtype
from megallama.data.jsonl import expand_inputs, format_skips, iter_line_batches, parse_lines
from megallama.data.workers import all_or_nothing, worker_results
from megallama.executors import Executor
from megallama.tokenizer import build_tokenizer


@dataclass
class PreprocessSummary:
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    skipped: Counter = field(default_factory=Counter)
    outputs: list = field(default_factory=list)

    @property
    def docs_per_second(self) -> float:
        return self.documents / self.seconds if self.seconds else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.input_bytes / 1e6 / self.seconds if self.seconds else 0.0


def output_prefix_for(output_prefix: str, key: str) -> str:
    return f"{output_prefix}_{key}_document"


_worker_tokenizer = None
_worker_dtype = None
_worker_threads = None


def _init_worker(tokenizer, dtype, threads) -> None:
    global _worker_tokenizer, _worker_dtype, _worker_threads
    _worker_tokenizer, _worker_dtype, _worker_threads = tokenizer, dtype, threads


def _encode_batch(task):
    path, first, lines, json_keys, append_eod, strict = task
    texts, skipped, _ = parse_lines(lines, json_keys, path, first, strict)
    encoded = {}
    for key in json_keys:
        flat, counts = _worker_tokenizer.encode_batch(texts[key], append_eod=append_eod, num_threads=_worker_threads)
        # Cast in the worker: uint16 ids are half the bytes to send back, and the writer has no
        # conversion left to do.
        encoded[key] = as_token_dtype(flat, _worker_dtype), counts
    return encoded, skipped, sum(len(x) for x in lines)


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_type: str = "SentencePieceTokenizer",
               tokenizer_model: str | None = None, vocab_size: int | None = None,
               json_keys: Sequence[str] = ("text",), append_eod: bool = False, workers: int = 1,
               log_interval: int = 1000, strict: bool = False, progress: bool = True,
               batch_lines: int = 1024, executor: Executor | None = None,
               require_documents: bool = True) -> PreprocessSummary:
    """Tokenize every usable line of ``inputs`` into one indexed dataset per JSON key: streamed
    through ``workers`` local processes, or one task per input file on ``executor``.

    Input lines that all were skipped (a wrong ``json_keys``, most likely) are a ValueError and
    nothing is written, unless ``require_documents`` is False (one file of a larger run).

    ``batch_lines`` lines (4 MB at most) make one task: 1024 took 3-5% less CPU than 512 on the
    24 MB benchmark corpus (fewer tokenizer calls), 2048 left two workers idle longer at the end."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    paths = expand_inputs(inputs)
    if executor is not None:
        return _preprocess_on(executor, paths, output_prefix, tokenizer_type, tokenizer_model, vocab_size,
                              json_keys, append_eod, strict, progress, batch_lines)
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, vocab_size)
    dtype = optimal_dtype(tokenizer.vocab_size)
    summary = PreprocessSummary()
    writers = {k: IndexedDatasetWriter(output_prefix_for(output_prefix, k), dtype) for k in json_keys}
    total_bytes = sum(os.path.getsize(p) for p in paths)
    compressed = any(strip_compression(p) != p for p in paths)  # sizes on disk are no total for decompressed bytes
    bar = tqdm(total=None if compressed else total_bytes, unit="B", unit_scale=True, disable=not progress,
               desc="preprocess", mininterval=1.0)
    tasks = ((path, first, lines, tuple(json_keys), append_eod, strict)
             for path, first, lines in iter_line_batches(paths, batch_lines))
    start = time.perf_counter()
    last_logged = 0
    with bar, all_or_nothing(writers.values()), \
            worker_results(_encode_batch, tasks, workers, _init_worker,
                           # one process: the tokenizer's threads on every core; several: one each
                           (tokenizer, dtype, None if workers == 1 else 1)) as results:
        for encoded, skipped, nbytes in results:
            for key, (flat, counts) in encoded.items():
                writers[key].add_documents(flat, counts)
                summary.tokens += int(flat.size)
            summary.documents += int(next(iter(encoded.values()))[1].size)
            summary.skipped.update(skipped)
            summary.input_bytes += nbytes
            bar.update(nbytes)
            if summary.documents - last_logged >= log_interval:
                last_logged = summary.documents
                elapsed = time.perf_counter() - start
                bar.set_postfix(docs=summary.documents, docs_s=f"{summary.documents / elapsed:.0f}",
                                skipped=sum(summary.skipped.values()), refresh=False)
        if require_documents:
            _check_documents(summary, json_keys)  # inside the block: a raise here leaves no output
    summary.seconds = time.perf_counter() - start
    summary.outputs = [output_prefix_for(output_prefix, k) for k in json_keys]
    return summary


def _preprocess_file(path: str, shard_prefix: str, tokenizer_type: str, tokenizer_model: str | None,
                     vocab_size: int | None, json_keys: Sequence[str], append_eod: bool, strict: bool,
                     batch_lines: int) -> PreprocessSummary:
    """One input file into ``shard_prefix`` (an executor task)."""
    return preprocess([path], shard_prefix, tokenizer_type, tokenizer_model, vocab_size, json_keys, append_eod,
                      workers=1, strict=strict, progress=False, batch_lines=batch_lines, require_documents=False)


def _preprocess_on(executor: Executor, paths: list[str], output_prefix: str, tokenizer_type: str,
                   tokenizer_model: str | None, vocab_size: int | None, json_keys: Sequence[str],
                   append_eod: bool, strict: bool, progress: bool, batch_lines: int) -> PreprocessSummary:
    shard_dir = output_prefix + ".shards"
    os.makedirs(shard_dir, exist_ok=True)
    start = time.perf_counter()
    shard_prefixes = [os.path.join(shard_dir, f"{i:05d}") for i in range(len(paths))]
    tasks = [(path, prefix, tokenizer_type, tokenizer_model, vocab_size, tuple(json_keys), append_eod, strict,
              batch_lines) for path, prefix in zip(paths, shard_prefixes)]
    parts = executor.run(_preprocess_file, tasks, "preprocess", progress, unit="file")
    summary = PreprocessSummary()
    for part in parts:
        summary.documents += part.documents
        summary.tokens += part.tokens
        summary.input_bytes += part.input_bytes
        summary.skipped.update(part.skipped)
    try:
        _check_documents(summary, json_keys)
    except ValueError:
        shutil.rmtree(shard_dir)
        raise
    for key in json_keys:
        merge_indexed_datasets([output_prefix_for(p, key) for p in shard_prefixes], output_prefix_for(output_prefix, key))
    shutil.rmtree(shard_dir)
    summary.seconds = time.perf_counter() - start
    summary.outputs = [output_prefix_for(output_prefix, k) for k in json_keys]
    return summary


def _check_documents(summary: PreprocessSummary, json_keys: Sequence[str]) -> None:
    """Refuse a run that read lines but kept none: an empty dataset would look like a result."""
    if summary.documents == 0 and summary.skipped:
        raise ValueError(f"no documents: all {sum(summary.skipped.values()):,} input lines were skipped "
                         f"({format_skips(summary.skipped)}); check --json-keys {' '.join(json_keys)}; nothing written")


def format_summary(summary: PreprocessSummary) -> str:
    skipped = sum(summary.skipped.values())
    lines = [f"wrote {summary.documents:,} documents, {summary.tokens:,} tokens to "
             + ", ".join(p + ".{bin,idx}" for p in summary.outputs),
             f"{summary.docs_per_second:,.0f} docs/s, {summary.mb_per_second:.1f} MB/s over {summary.seconds:.1f} s",
             f"skipped {skipped:,} lines" + (":" if skipped else "")]
    lines += [f"  {n:,} {reason}" for reason, n in summary.skipped.most_common()]
    if summary.documents == 0:
        lines.append("warning: no documents were written (megatron-core cannot open an empty dataset)")
    return "\n".join(lines)
