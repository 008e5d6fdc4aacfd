#!/usr/bin/env bash
# The LLaMA data recipe on a Ray cluster: the seven sources cleaned (examples/clean_llama_corpus.sh)
# and then tokenized (examples/preprocess_llama_data.sh), every shard task on the cluster's CPUs.
# The output is the same as a local run's.
#
#   RAY_ADDRESS=10.0.0.1:6379 RAW=/shared/raw OUT=/shared/cleaned TOKENIZED=/shared/tokenized \
#       bash examples/clean_llama_corpus_ray.sh
#
# Needs: a running cluster (`ray start --head` on one node, `ray start --address HEAD:6379` on the
# others; on Slurm see examples/clean_llama_corpus_ray.sbatch), megallama installed on every node
# (pip install -e .[cluster]), and RAW, OUT and TOKENIZED on a filesystem every node sees at the
# same path (workers read the inputs and write the outputs themselves). Without RAY_ADDRESS the
# tools use the cluster started on this machine, or start a local one. Rerunning after a crash
# (of the driver, a worker or a node) resumes from the completion markers.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${RAW:?set RAW to the raw downloads (layout: examples/clean_llama_corpus.sh)}"
: "${OUT:?set OUT to the folder for the cleaned JSONL}"
: "${TOKENIZED:?set TOKENIZED to the folder for the tokenizer and the .bin/.idx files}"
export RAW OUT
export EXECUTOR_FLAGS="--executor ray${RAY_ADDRESS:+ --ray-address $RAY_ADDRESS}"

bash examples/clean_llama_corpus.sh
CLEAN="$OUT" OUT="$TOKENIZED" bash examples/preprocess_llama_data.sh
