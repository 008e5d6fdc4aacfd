#!/usr/bin/env bash
# LLaMA-65B (65.3B parameters, the paper's 65.2B: 80 layers, dim 8192, 64 heads, FFN 22016), peak lr 1.5e-4, 1.4T
# tokens = 333,787 iterations of 4,194,304 tokens (the paper: 2048 A100-80GB, ~21 days, ~380
# tokens/s/GPU). Usage, on every node:
#   NNODES=256 NODE_RANK=<0..255> MASTER_ADDR=<node 0> MASTER_PORT=6000 GPUS_PER_NODE=8 examples/pretrain_llama_65b.sh
#
# Layout: the planner's first choice for 2048 A100-80GB at micro-batch 1 (tests/planning checks it):
#   python tools/plan.py --model-size 65b --gpus 2048 --train-tokens 1.4e12 --micro-batch-size 1 \
#       --overlap-param-gather
#   → TP=4 (16 heads per rank) PP=8 interleaved in 10 chunks of 1 layer per rank, sequence
#     parallelism, distributed optimizer, DP=64 (32 micro-batches, a multiple of PP): 22.8 GB per
#     GPU; 302 tokens/s/GPU, 26 days (the planner without this codebase's exposed communication:
#     add --overlap-communication, and its first choice, TP=8 PP=4, makes 329 tokens/s/GPU at
#     micro-batch 1; this layout 315).
MODEL_SIZE=65b LR=1.5e-4 TRAIN_ITERS=333787 TP=4 PP=8
EXTRA_FLAGS="--sequence-parallel --num-layers-per-virtual-pipeline-stage 1"
source "$(dirname "$0")/pretrain_llama_common.sh"
