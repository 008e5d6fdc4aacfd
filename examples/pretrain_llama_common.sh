#!/usr/bin/env bash
# Shared part of pretrain_llama_{7b,13b,33b,65b}.sh and pretrain_llama{2_7b,3_8b}.sh: the launcher,
# the paper's data mixture and optimisation recipe. Sourced after the size script has set
# MODEL_SIZE LR TRAIN_ITERS TP PP and EXTRA_FLAGS, and, where it differs from LLaMA-1's, SEQ_LENGTH,
# GLOBAL_BATCH_SIZE, TOKENIZER_TYPE and VOCAB_SIZE. Run the size script once on every node (same
# command, NODE_RANK differing).
#
# Launcher environment (torchrun's multi-node rendezvous; defaults are a single node):
#   NNODES         number of nodes                   (default 1)
#   NODE_RANK      this node's index, 0 … NNODES-1   (default 0)
#   MASTER_ADDR    address of node 0                 (default 127.0.0.1)
#   MASTER_PORT    a free port on node 0             (default 6000)
#   GPUS_PER_NODE  processes (GPUs) per node         (default 8)
# Paths: DATA_DIR (PREFIX_text_document.{bin,idx} per source, from examples/preprocess_llama_data.sh),
# TOKENIZER_MODEL, CHECKPOINT_DIR (on a filesystem every node shares), TENSORBOARD_DIR.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
DATA_DIR=${DATA_DIR:-data/llama}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$DATA_DIR/tokenizer.model}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-SentencePieceTokenizer}
VOCAB_SIZE=${VOCAB_SIZE:-32000}
SEQ_LENGTH=${SEQ_LENGTH:-2048}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-2048}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/llama-$MODEL_SIZE}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$CHECKPOINT_DIR/tensorboard}

# The paper's mixture (Table 1), as sampling weights: each source is drawn in this proportion
# whatever its size, which gives the epochs of Table 1 (Wikipedia and Books ~2.4, GitHub 0.64).
DATA_PATH=(
  67.0 "$DATA_DIR/commoncrawl_text_document"
  15.0 "$DATA_DIR/c4_text_document"
  4.5 "$DATA_DIR/github_text_document"
  4.5 "$DATA_DIR/wikipedia_text_document"
  4.5 "$DATA_DIR/books_text_document"
  2.5 "$DATA_DIR/arxiv_text_document"
  2.0 "$DATA_DIR/stackexchange_text_document"
)

# 4M-token batches: 2048 sequences of 2048 tokens (4,194,304 tokens; LLaMA-2/3 keep the tokens
# with longer sequences). DP = NNODES·GPUS_PER_NODE / (TP·PP) must divide GLOBAL_BATCH_SIZE (use a
# power-of-two number of nodes).
# AdamW β=(0.9, 0.95), weight decay 0.1, clipping 1.0, 2000 warmup steps, cosine decay to 10% of
# the peak lr (--min-lr defaults to it); the paper gives no Adam epsilon, Llama 2 reports 1e-5. bf16 weights and activations with fp32 main weights and
# gradient accumulation; the distributed optimizer shards the 12 bytes/param of fp32 main weights
# and Adam moments over DP (so a GPU holds ≈ 2 + 4 + 12/DP bytes per parameter of its shard, plus
# activations; NCCL reduce-scatters the gradients in place: `python tools/plan.py` has the full count).
# --overlap-param-gather leaves each step's weight all-gathers in flight until the next forward needs
# them (Megatron's flag; bit-identical results, no extra memory: they write into the weights).
exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megallama.pretrain \
  --model-size "$MODEL_SIZE" --seq-length "$SEQ_LENGTH" --max-position-embeddings "$SEQ_LENGTH" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --use-distributed-optimizer --overlap-param-gather --bf16 --recompute-granularity selective \
  --micro-batch-size 1 --global-batch-size "$GLOBAL_BATCH_SIZE" --train-iters "$TRAIN_ITERS" \
  --lr "$LR" --lr-decay-style cosine --lr-warmup-iters 2000 \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-5 --clip-grad 1.0 \
  --data-path "${DATA_PATH[@]}" --split 969,30,1 \
  --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL" --vocab-size "$VOCAB_SIZE" \
  --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 1000 \
  --log-interval 10 --eval-interval 1000 --eval-iters 10 --tensorboard-dir "$TENSORBOARD_DIR" \
  ${EXTRA_FLAGS:-} "$@"
