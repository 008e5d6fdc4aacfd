#!/usr/bin/env bash
# LLaMA-13B (13.0B parameters: 40 layers, dim 5120, 40 heads, FFN 13824), peak lr 3e-4, 1.0T tokens
# = 238,419 iterations of 4,194,304 tokens. Usage, on every node:
#   NNODES=16 NODE_RANK=<0..15> MASTER_ADDR=<node 0> MASTER_PORT=6000 GPUS_PER_NODE=8 examples/pretrain_llama_13b.sh
#
# Layout: TP=2 (within a node, over NVLink), PP=1, sequence parallelism. At TP=1 the 6 B/param of
# bf16 weights and fp32 gradients alone would take 78 GB; split in two:
#   6.5e9 × (6 + 12/64) ≈ 40.2 GB at DP = 64 (16 nodes), 58.5 GB on one node (DP = 4);
#   activations ≤ 40 × 34 × 2048 × 5120 / 2 ≈ 7.1 GB (sequence parallelism divides them by TP)
#   → ≈ 47 GB (66 GB on one node) of 80 GB.
MODEL_SIZE=13b LR=3.0e-4 TRAIN_ITERS=238419 TP=2 PP=1
EXTRA_FLAGS="--sequence-parallel"
source "$(dirname "$0")/pretrain_llama_common.sh"
