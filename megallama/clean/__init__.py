"""Corpus cleaning: the LLaMA paper's (§2.1) per-source recipe.

Stages (`html`, `langid`, `dedup`, `perplexity`, `quality`, `heuristics`) are plain functions or
small classes; `io` reads compressed inputs (truncation is an error, records are size-capped);
`sources/` holds one cleaner per source (commoncrawl, c4, github, wikipedia, books, arxiv,
stackexchange); `runner.clean_corpus` runs a source over input shards in parallel, resumably, and
writes JSONL (`{"text": ..., "meta": {...}}`) for `tools/preprocess_data.py` plus a JSON report.
"""
