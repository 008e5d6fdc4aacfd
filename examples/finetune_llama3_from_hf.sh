#!/usr/bin/env bash
# Continue training a LLaMA-3-8B Hugging Face directory (e.g. Meta-Llama-3-8B: config.json,
# model-*.safetensors, tokenizer.json) on your own documents: --finetune --load HF_DIR reads the HF
# weights into this run's TP × PP layout (no conversion step) and starts iteration, optimizer and lr
# schedule afresh; --save writes megallama checkpoints, which a relaunch of the same command resumes
# from. Export the result for transformers with
#   python tools/convert_checkpoint.py --load $CHECKPOINT_DIR --save OUT --target-format hf
# (the tokenizer folder's files go along). Usage, on one node of 8 GPUs:
#   HF_DIR=Meta-Llama-3-8B DATA_PREFIX=data/mydocs_text_document examples/finetune_llama3_from_hf.sh
#
# Data: documents tokenized with the model's own tokenizer folder, e.g.
#   python tools/preprocess_data.py --input docs.jsonl --output-prefix data/mydocs \
#       --tokenizer-type HuggingFaceTokenizer --tokenizer-model $HF_DIR --append-eod
# The shape flags must be the directory's (the run refuses weights of another shape, θ or rope
# scaling): --model-size llama3-8b, spelled out in Megatron's flags.
#
# Launcher environment as pretrain_llama_common.sh (NNODES NODE_RANK MASTER_ADDR MASTER_PORT GPUS_PER_NODE).
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-6000}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
HF_DIR=${HF_DIR:-Meta-Llama-3-8B}
DATA_PREFIX=${DATA_PREFIX:-data/mydocs_text_document}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/llama3-8b-finetuned}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-$CHECKPOINT_DIR/tensorboard}

# TP=2 with sequence parallelism and the distributed optimizer holds the 8B model and 8192-token
# activations on 80 GB GPUs; DP = GPUS/2. Batches of 64 × 8192 tokens (0.5M), a finetuning lr of
# 2e-5 warmed up over 50 iterations and decayed (cosine) to 2e-6 over 1000.
exec torchrun \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megallama.pretrain \
  --model-size llama3-8b --group-query-attention --num-query-groups 8 --rotary-base 500000 \
  --untie-embeddings-and-output-weights --seq-length 8192 --max-position-embeddings 8192 \
  --finetune --load "$HF_DIR" --save "$CHECKPOINT_DIR" --save-interval 200 \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$HF_DIR" \
  --data-path "$DATA_PREFIX" --split 98,2,0 \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --sequence-parallel \
  --use-distributed-optimizer --overlap-param-gather --bf16 --recompute-granularity selective \
  --micro-batch-size 1 --global-batch-size 64 --train-iters 1000 \
  --lr 2e-5 --min-lr 2e-6 --lr-decay-style cosine --lr-warmup-iters 50 \
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-5 --clip-grad 1.0 \
  --log-interval 10 --eval-interval 200 --eval-iters 10 --tensorboard-dir "$TENSORBOARD_DIR" \
  "$@"
