#!/usr/bin/env bash
# Side-by-side pretraining on one GPU: megallama vs torchtitan vs megatron-core (issue 18), for a
# lent CUDA machine without a package registry. Needs the peers' wheels in .whl/ (`make
# peer-wheels` on a machine with a registry; carry .whl along). Builds the CUDA kernels in place,
# then runs bench/pretrain_gpu_peers.py on every shape; the figures (JSON, with the device name
# and the command) and the console log go to OUT_DIR.
# Usage from the repo root: bash bench/gpu_peers.sh [OUT_DIR]   (ROUNDS, ITERS, SHAPES override;
# e.g. SHAPES=16x2048 first: each shape is ~3 runs of 20 s to 2 min, torch.compile included;
# PROFILE_DIR=DIR adds each side's torch.profiler table and trace under DIR).
set -uo pipefail
OUT=${1:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
python3 setup.py -q build_ext --inplace || exit 1
python3 bench/pretrain_gpu_peers.py --rounds "${ROUNDS:-1}" --iters "${ITERS:-10}" ${SHAPES:+--shapes $SHAPES} \
    ${PROFILE_DIR:+--profile-dir "$PROFILE_DIR"} \
    --json "$OUT/pretrain_gpu_peers.json" 2>&1 | tee "$OUT/pretrain_gpu_peers.txt"
exit "${PIPESTATUS[0]}"
