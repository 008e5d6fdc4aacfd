#!/usr/bin/env bash
# LLaMA-13B (13.0B parameters: 40 layers, dim 5120, 40 heads, FFN 13824), peak lr 3e-4, 1.0T tokens
# = 238,419 iterations of 4,194,304 tokens. Usage, on every node:
#   NNODES=16 NODE_RANK=<0..15> MASTER_ADDR=<node 0> MASTER_PORT=6000 GPUS_PER_NODE=8 examples/pretrain_llama_13b.sh
#
# Layout: the planner's first choice for 128 A100-80GB at micro-batch 1 (tests/planning checks it):
#   python tools/plan.py --model-size 13b --gpus 128 --train-tokens 1e12 --micro-batch-size 1 --overlap-param-gather
#   → TP=2 (within a node) PP=1 DP=64, sequence parallelism, distributed optimizer: 46.0 GB per GPU
#     (weights 13.0 + grads 26.0 + main weights and AdamW 1.2 + activations 5.7 + buffers 0.1 at the
#     forward/backward turn);
#     1,724 tokens/s/GPU. At TP=1 the weights and gradients alone would not fit.
MODEL_SIZE=13b LR=3.0e-4 TRAIN_ITERS=238419 TP=2 PP=1
EXTRA_FLAGS="--sequence-parallel"
source "$(dirname "$0")/pretrain_llama_common.sh"
