#!/usr/bin/env bash
# A tiny LLaMA on 4 CPU processes: TP=2 × PP=2 (gloo), synthetic tokens, checkpoint and resume.
# Runs on a laptop in under a minute (about 20 s on 2 cores):  examples/pretrain_llama_cpu.sh [extra flags]
# OUT (default /tmp/megallama_cpu) receives checkpoints and TensorBoard scalars; a second run
# resumes from the last checkpoint (delete OUT to start over): after all 40 iterations it stops at
# once, and training on (e.g. --train-iters 80) is another lr schedule, which a resume refuses unless
# --override-opt_param-scheduler is given too.
set -euo pipefail
OUT=${OUT:-/tmp/megallama_cpu}
# One thread per process: 4 processes already cover the cores; more threads only contend.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec torchrun --standalone --nproc-per-node 4 -m megallama.pretrain \
  --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel \
  --num-layers 4 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 176 \
  --untie-embeddings-and-output-weights \
  --seq-length 64 --vocab-size 512 \
  --micro-batch-size 2 --global-batch-size 8 --train-iters 40 \
  --lr 1e-3 --lr-warmup-iters 4 --mock-data \
  --save "$OUT" --load "$OUT" --save-interval 20 \
  --log-interval 5 --eval-interval 20 --eval-iters 2 --tensorboard-dir "$OUT/tensorboard" "$@"
