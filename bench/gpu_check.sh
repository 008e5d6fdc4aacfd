#!/usr/bin/env bash
# The checks that need a GPU, in one pass, for a lent CUDA machine (CI is CPU-only): builds the
# extensions with their CUDA kernels in place, checks the fused ops against torch and times them
# against the memory bandwidth, runs the CUDA tests (model, DP/optimizer, TP layers on NCCL, no
# host syncs in a training step under torch's sync debugger) and the one-GPU bf16 pretrain
# benchmark (MFU): bench/gpu_session.sh's ops, tests and mfu parts.
# Usage from the repo root: bash bench/gpu_check.sh [OUT_DIR]
PARTS="ops tests mfu" exec bash "$(dirname "$0")/gpu_session.sh" "${1:-${OUT:-/tmp/megallama_gpu_check}}"
