#!/usr/bin/env bash
# LLaMA's data recipe after cleaning: train the tokenizer, tokenize the seven sources, and print
# the blended --data-path with the paper's sampling proportions (Touvron et al. 2023, Table 1).
#
#   CLEAN=/data/clean OUT=/data/tokenized bash examples/preprocess_llama_data.sh
#
# CLEAN/<source>/*.jsonl[.zst|.gz] are the cleaned JSONL shards (field "text") of each source, as
# written by tools/clean_corpus.py. To use Meta's released tokenizer instead of training one, set
# TOKENIZER=/path/to/tokenizer.model (else VOCAB_SIZE pieces are trained, default 32000).
# EXECUTOR_FLAGS="--executor ray" tokenizes on a Ray cluster; WORKERS (default: every CPU) tokenizing
# processes otherwise. TRAIN_TOKENS (default 1.4e12) is the run the epochs report is made for.
set -euo pipefail
cd "$(dirname "$0")/.."

CLEAN=${CLEAN:?set CLEAN to the folder holding one sub-folder of cleaned JSONL per source}
OUT=${OUT:?set OUT to the folder for the tokenizer and the .bin/.idx files}
WORKERS=${WORKERS:-$(nproc)}
EXECUTOR_FLAGS=${EXECUTOR_FLAGS:-}
TRAIN_TOKENS=${TRAIN_TOKENS:-1.4e12}
mkdir -p "$OUT"

# source folder -> sampling proportion in percent (Table 1)
declare -A SHARE=(
  [commoncrawl]=67.0 [c4]=15.0 [github]=4.5 [wikipedia]=4.5 [books]=4.5 [arxiv]=2.5 [stackexchange]=2.0
)
SOURCES=(commoncrawl c4 github wikipedia books arxiv stackexchange)

# 1. Tokenizer: BPE with 32000 pieces, numbers split into digits, byte fallback (the paper's §2).
#    10M sentences sampled from all sources are plenty for a 32k vocabulary.
if [[ -z "${TOKENIZER:-}" ]]; then
  TOKENIZER="$OUT/llama_tokenizer.model"
  if [[ ! -f "$TOKENIZER" ]]; then
    inputs=()
    for s in "${SOURCES[@]}"; do inputs+=("$CLEAN/$s/*.jsonl*"); done
    python tools/train_tokenizer.py --input "${inputs[@]}" --vocab-size "${VOCAB_SIZE:-32000}" \
      --input-sentence-size 10000000 --output-prefix "${TOKENIZER%.model}"
  fi
fi

# 2. Tokenize each source into OUT/<source>_text_document.{bin,idx}; a finished source is skipped.
for s in "${SOURCES[@]}"; do
  if [[ -f "$OUT/${s}_text_document.idx" ]]; then
    echo "$s: already tokenized"
    continue
  fi
  python tools/preprocess_data.py --input "$CLEAN/$s/*.jsonl*" --json-keys text \
    --output-prefix "$OUT/$s" --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$TOKENIZER" --append-eod --workers "$WORKERS" $EXECUTOR_FLAGS
done

# 3. The blend for training, and the epochs each source will see over TRAIN_TOKENS tokens.
DATA_PATH=""
for s in "${SOURCES[@]}"; do DATA_PATH+="${SHARE[$s]} $OUT/${s}_text_document "; done
echo
echo "--data-path $DATA_PATH"
python tools/mixture_report.py --data-path $DATA_PATH --train-tokens "$TRAIN_TOKENS"
