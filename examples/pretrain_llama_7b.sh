#!/usr/bin/env bash
# LLaMA-7B (6.7B parameters: 32 layers, dim 4096, 32 heads, FFN 11008), peak lr 3e-4, 1.0T tokens
# = 238,419 iterations of 4,194,304 tokens. Usage, on every node:
#   NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0> MASTER_PORT=6000 GPUS_PER_NODE=8 examples/pretrain_llama_7b.sh
#
# Layout: the planner's first choice for 64 A100-80GB at micro-batch 1 (tests/planning checks it):
#   python tools/plan.py --model-size 7b --gpus 64 --train-tokens 1e12 --micro-batch-size 1 --overlap-param-gather
#   → TP=1 PP=1 DP=64, distributed optimizer: 49.1 GB per GPU = weights 13.5 + grads 27.0 + main 0.4
#     + Adam 0.8 + activations 7.4 + buffers 0.0 at the forward/backward turn;
#     3,363 tokens/s/GPU, 54 days on 64 GPUs. Model parallelism would only add communication.
MODEL_SIZE=7b LR=3.0e-4 TRAIN_ITERS=238419 TP=1 PP=1
source "$(dirname "$0")/pretrain_llama_common.sh"
