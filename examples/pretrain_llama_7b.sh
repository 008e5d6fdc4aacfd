#!/usr/bin/env bash
# LLaMA-7B (6.7B parameters: 32 layers, dim 4096, 32 heads, FFN 11008), peak lr 3e-4, 1.0T tokens
# = 238,419 iterations of 4,194,304 tokens. Usage, on every node:
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0> MASTER_PORT=6000 GPUS_PER_NODE=8 examples/pretrain_llama_7b.sh
#
# Layout: TP=1, PP=1: no model parallelism, every GPU is a data-parallel rank. 6.7B parameters fit
# one 80 GB GPU once the distributed optimizer shards the fp32 state:
#   weights bf16 2 B + fp32 grads 4 B + (fp32 main 4 B + Adam 8 B)/DP per parameter
#   = 6.74e9 × (6 + 12/64) ≈ 41.7 GB at DP = 64 (8 nodes), 50.5 GB on one node (DP = 8);
#   activations (selective recompute, micro-batch 1) ≤ 34·s·h bytes per layer (Korthikanti et al.)
#   = 32 × 34 × 2048 × 4096 ≈ 9.1 GB  →  ≈ 51 GB (60 GB on one node) of 80 GB.
# Model parallelism would only add communication: DP alone is the fastest layout that fits.
MODEL_SIZE=7b LR=3.0e-4 TRAIN_ITERS=238419 TP=1 PP=1
source "$(dirname "$0")/pretrain_llama_common.sh"
