#!/usr/bin/env bash
# LLaMA-33B (32.5B parameters: 60 layers, dim 6656, 52 heads, FFN 17920), peak lr 1.5e-4, 1.4T
# tokens = 333,787 iterations of 4,194,304 tokens. Usage, on every node:
#   NNODES=32 NODE_RANK=<0..31> MASTER_ADDR=<node 0> MASTER_PORT=6000 GPUS_PER_NODE=8 examples/pretrain_llama_33b.sh
#
# Layout: the planner's choice for 256 A100-80GB at micro-batch 1 (within 0.5% of its first, v=5, whose
# order against it the CPU-measured bubble factors decide; tests/planning checks it):
#   python tools/plan.py --model-size 33b --gpus 256 --train-tokens 1.4e12 --micro-batch-size 1 \
#       --overlap-param-gather
#   → TP=2 (26 heads per rank) PP=2 interleaved in 6 chunks of 5 layers per rank, sequence
#     parallelism, distributed optimizer, DP=64: 62.4 GB per GPU (weights 16.3 + grads 32.5 + AdamW
#     1.5 + the first stage's 13 chunk forwards in flight 11.9); 681 tokens/s/GPU.
MODEL_SIZE=33b LR=1.5e-4 TRAIN_ITERS=333787 TP=2 PP=2
EXTRA_FLAGS="--sequence-parallel --num-layers-per-virtual-pipeline-stage 5"
source "$(dirname "$0")/pretrain_llama_common.sh"
