#!/usr/bin/env bash
# The checks that need a GPU, in one pass, for a lent CUDA machine (CI is CPU-only):
# builds the extensions with their CUDA kernels in place, checks the fused ops against torch,
# runs the CUDA tests (model, DP/optimizer, TP layers on NCCL, no host syncs in a training step under
# torch's sync debugger) and the one-GPU bf16 pretrain
# benchmark (MFU). Usage from the repo root: bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
OUT=${1:-${OUT:-/tmp/megallama_gpu_check}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
status=0
step() { echo "=== $*"; "$@" || { echo "!!! failed: $*"; status=1; }; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
step python3 setup.py -q build_ext --inplace
step python3 bench/ops_cuda_check.py --no-build
step python3 -m pytest -q -p no:cacheprovider tests/model/test_cuda.py tests/distributed/test_cuda.py tests/parallel/test_cuda.py \
    tests/training/test_host_syncs.py::test_cuda_iterations_that_do_not_log_never_synchronise
step python3 bench/pretrain.py --rounds 1
exit $status
