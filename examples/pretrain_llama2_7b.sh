#!/usr/bin/env bash
# LLaMA-2-7B (6.7B parameters: 32 layers, dim 4096, 32 heads, FFN 11008, untied, RMSNorm eps 1e-5),
# the Llama 2 paper's recipe: sequences of 4096 tokens, 4M-token batches (1024 × 4096), peak lr 3e-4,
# 2.0T tokens = 476,838 iterations of 4,194,304 tokens. The paper publishes no data mixture: this
# trains on LLaMA-1's (pretrain_llama_common.sh); give yours there. Usage, on every node:
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0> MASTER_PORT=6000 GPUS_PER_NODE=8 examples/pretrain_llama2_7b.sh
#
# Layout: the planner's first choice for 64 A100-80GB at micro-batch 1 (tests/planning checks it):
#   python tools/plan.py --model-size llama2-7b --seq-length 4096 --global-batch-size 1024 \
#       --gpus 64 --train-tokens 2e12 --micro-batch-size 1 --overlap-param-gather
#   → TP=1 PP=1 DP=64, distributed optimizer: 56.5 GB per GPU, 3,135 tokens/s/GPU.
MODEL_SIZE=llama2-7b LR=3.0e-4 TRAIN_ITERS=476838 TP=1 PP=1
SEQ_LENGTH=4096 GLOBAL_BATCH_SIZE=1024
source "$(dirname "$0")/pretrain_llama_common.sh"
