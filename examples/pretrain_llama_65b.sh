#!/usr/bin/env bash
# LLaMA-65B (65.2B parameters: 80 layers, dim 8192, 64 heads, FFN 22016), peak lr 1.5e-4, 1.4T
# tokens = 333,787 iterations of 4,194,304 tokens (the paper: 2048 A100-80GB, ~21 days, ~380
# tokens/s/GPU). Usage, on every node:
#   NNODES=256 NODE_RANK=<0..255> MASTER_ADDR=<node 0> MASTER_PORT=6000 GPUS_PER_NODE=8 examples/pretrain_llama_65b.sh
#
# Layout: TP=8 (a whole node, NVLink; 8 heads per rank), PP=2 (40 layers per stage, interleaved in
# 4 chunks of 10 layers), sequence parallelism. A replica spans 2 nodes, so DP = NNODES / 2.
#   parameters per GPU 65.2e9 / 16 ≈ 4.08e9 × (6 + 12/128) ≈ 24.8 GB at DP = 128 (36.7 GB at DP = 4);
#   activations ≤ 80 × 34 × 2048 × 8192 / 8 ≈ 5.7 GB  →  ≈ 31 GB (42 GB at DP = 4) of 80 GB.
# PP=1 would hold 8.15e9 parameters per GPU (≈ 55 GB with activations, too little headroom for
# buffers); TP beyond 8 would cross nodes. Interleaving (v = 4) cuts the bubble from
# 1/(m+1) to 1/(4m+1): m = 2048 / 128 = 16 micro-batches at DP = 128, a multiple of PP as the
# interleaved schedule needs.
MODEL_SIZE=65b LR=1.5e-4 TRAIN_ITERS=333787 TP=8 PP=2
EXTRA_FLAGS="--sequence-parallel --num-layers-per-virtual-pipeline-stage 10"
source "$(dirname "$0")/pretrain_llama_common.sh"
