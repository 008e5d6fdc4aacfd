#!/usr/bin/env bash
# LLaMA-33B (32.5B parameters: 60 layers, dim 6656, 52 heads, FFN 17920), peak lr 1.5e-4, 1.4T
# tokens = 333,787 iterations of 4,194,304 tokens. Usage, on every node:
#   NNODES=32 NODE_RANK=<0..31> MASTER_ADDR=<node 0> MASTER_PORT=6000 GPUS_PER_NODE=8 examples/pretrain_llama_33b.sh
#
# Layout: TP=4 (52 heads split 13 per rank; within a node), PP=2 (30 layers per stage), sequence
# parallelism. One pipeline replica spans one node (4 × 2 = 8 GPUs), so DP = NNODES.
#   parameters per GPU 32.5e9 / 8 ≈ 4.06e9 × (6 + 12/32) ≈ 25.9 GB at DP = 32 (48.8 GB at DP = 2);
#   activations: 1F1B keeps up to PP micro-batches in flight on the first stage, i.e. the whole
#   stack's worth: 60 × 34 × 2048 × 6656 / 4 ≈ 7.0 GB  →  ≈ 33 GB (56 GB at DP = 2) of 80 GB.
# TP=4 with PP=1 would need ≈ 59 GB before workspace and fragmentation; PP=2 keeps headroom at a
# pipeline bubble of (p−1)/(m+p−1) = 1/65 ≈ 1.5% (m = 2048 / DP = 64 micro-batches at DP = 32).
MODEL_SIZE=33b LR=1.5e-4 TRAIN_ITERS=333787 TP=4 PP=2
EXTRA_FLAGS="--sequence-parallel"
source "$(dirname "$0")/pretrain_llama_common.sh"
