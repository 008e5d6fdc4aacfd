#!/usr/bin/env bash
# The LLaMA paper's data recipe (Touvron et al. 2023, §2.1): the seven sources, from their raw
# downloads to cleaned JSONL ({"text", "meta"}) ready for tools/preprocess_data.py.
# Each source's cleaner applies the paper's settings (see megallama/clean/sources/*.py); every
# command is resumable: rerun it after a crash and it finishes the shards left.
#
#   RAW=/data/raw OUT=/data/cleaned WORKERS=64 bash examples/clean_llama_corpus.sh
#
# EXECUTOR_FLAGS="--executor ray" runs every command on a Ray cluster instead (what
# examples/clean_llama_corpus_ray.sh does). SAMPLE_SHARDS (default 100) is how many of the first
# CommonCrawl pass's output files, spread evenly over it, make the sample of steps 2 and 3 (one
# output file per input WET file: a shell glob of all of them outgrows the argument limit).
#
# Expected layout under $RAW (what each project distributes):
#   commoncrawl/*.warc.wet.gz            CommonCrawl WET files (the paper used five 2017-2020 dumps)
#   c4/en/c4-train.*.json.gz             C4 English
#   github/*.jsonl.gz                    BigQuery `github_repos` rows: repo_name, path, license, content
#   wikipedia/??wiki-2022*-pages-articles.xml.bz2
#                                        June-August 2022 dumps: bg ca cs da de en es fr hr hu it nl pl
#                                        pt ro ru sl sr sv uk
#   books/gutenberg/*.txt books/books3/*.txt
#   arxiv/arXiv_src_*.tar                arXiv's bulk LaTeX source archives
#   stackexchange/*/Posts.xml            the 28 largest sites, one folder per site (7z extracted)
#   quality/references.jsonl             pages cited as references by Wikipedia ({"text": ...})
set -euo pipefail
cd "$(dirname "$0")/.."

RAW=${RAW:-raw}
OUT=${OUT:-cleaned}
WORKERS=${WORKERS:-$(nproc)}
EXECUTOR_FLAGS=${EXECUTOR_FLAGS:-}
SAMPLE_SHARDS=${SAMPLE_SHARDS:-100}
mkdir -p "$OUT"

clean() {  # clean SOURCE INPUT...
    local source=$1; shift
    python tools/clean_corpus.py --source "$source" --output "$OUT/$source" \
        --report "$OUT/$source.report.json" --workers "$WORKERS" $EXECUTOR_FLAGS --input "$@"
}

# CommonCrawl, step 1: a first CCNet pass (line dedup, language ID, length) without the model
# filters: the random pages of the classifier, and the sample that sets the perplexity buckets.
python tools/clean_corpus.py --source commoncrawl --input "$RAW"/commoncrawl \
    --output "$OUT/commoncrawl-unfiltered" --report "$OUT/commoncrawl-unfiltered.report.json" --workers "$WORKERS" \
    $EXECUTOR_FLAGS
# The sample: SAMPLE_SHARDS of its output files, evenly spaced in name order (all of them if fewer).
mapfile -t cc_sample < <(find "$OUT/commoncrawl-unfiltered" -maxdepth 1 -name '*.jsonl' | sort |
    awk -v n="$SAMPLE_SHARDS" '{f[NR] = $0} END {k = NR < n ? NR : n; for (i = 0; i < k; i++) print f[1 + int(i * NR / k)]}')
# CommonCrawl, step 2: CCNet's n-gram model. English Wikipedia, cleaned; a SentencePiece model of it;
# a 5-gram KenLM model (interpolated modified Kneser-Ney) over its pieces; the head/middle/tail
# cut-offs are the 30th/60th perplexity percentiles of the sample of unfiltered CommonCrawl pages.
python tools/clean_corpus.py --source wikipedia --input "$RAW"/wikipedia/enwiki-2022*-pages-articles.xml.bz2 \
    --output "$OUT/wikipedia-en" --report "$OUT/wikipedia-en.report.json" --workers "$WORKERS" $EXECUTOR_FLAGS
python tools/train_tokenizer.py --input "$OUT"/wikipedia-en/*.jsonl --vocab-size 65536 --output-prefix "$OUT/lm/en.sp"
python tools/train_ngram_lm.py --input "$OUT"/wikipedia-en/*.jsonl --tokenizer-model "$OUT/lm/en.sp.model" \
    --order 5 --output "$OUT/lm/en.bin" --percentiles-from "${cc_sample[@]}"
# CommonCrawl, step 3: the reference-page classifier (Wikipedia references vs. random pages).
python tools/train_quality_classifier.py --positive "$RAW"/quality/references.jsonl \
    --negative "${cc_sample[@]}" --max-per-class 1000000 --output "$OUT/quality.bin"
# CommonCrawl, step 4: the full recipe: the head and middle perplexity buckets (as RedPajama),
# then the pages classified as references.
python tools/clean_corpus.py --source commoncrawl --input "$RAW"/commoncrawl \
    --perplexity-model "$OUT/lm/en.bin" --perplexity-buckets head,middle \
    --quality-model "$OUT/quality.bin" --quality-threshold 0.5 \
    --output "$OUT/commoncrawl" --report "$OUT/commoncrawl.report.json" --workers "$WORKERS" $EXECUTOR_FLAGS

clean c4 "$RAW"/c4/en                           # C4 heuristics, exact + line dedup, English
clean github "$RAW"/github                      # Apache/BSD/MIT, line-length and alphanumeric rules, header removal, dedup
clean wikipedia "$RAW"/wikipedia                # wikitext to text, the 20 languages
clean books "$RAW"/books/gutenberg "$RAW"/books/books3   # boilerplate removed, >90% overlap dropped
clean arxiv "$RAW"/arxiv                        # first section to bibliography, comments removed, macros expanded
clean stackexchange "$RAW"/stackexchange        # questions with answers by score, HTML removed

echo "cleaned JSONL in $OUT/*/ — next: tools/preprocess_data.py per source, blended with the paper's weights"
