#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one device call that fits its 10-minute command limit.
# After building the CUDA kernels, the parts PARTS names, in its order (default all):
#   ops    the fused kernels against torch, and their bandwidth at the 16×2048 shapes
#   peers  the 16×2048 model against torchtitan and megatron-core, with each side's profile
#          (bench/gpu_peers.sh; needs .whl/ from `make peer-wheels` in the call's carry)
#   tests  the CUDA tests (model, DP/optimizer, TP on NCCL, no host syncs under the sync debugger)
#   mfu    bench/pretrain.py: MFU, and a plain HF bf16 loop for scale
#   fusion bench/grad_accumulation_fusion.py: the 16×2048 model with and without
#          --no-gradient-accumulation-fusion
#   7b     the 7B cut against the peers
# Each part has its own time bound inside BUDGET seconds (default 540), so a slow part costs only
# itself. Output under OUT_DIR: the console (gpu_session.txt), the peers' figures and the profile
# tables of the 16×2048 run (peers_16x2048/profiles.txt). bench/gpu_check.sh is ops+tests+mfu alone.
# Usage from the repo root: [PARTS="ops peers"] [BUDGET=300] bash bench/gpu_session.sh [OUT_DIR]
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_session.txt") 2>&1
status=0
part() {
    local limit=$1; shift
    local left=$((BUDGET - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then echo "=== skipped (budget spent): $*"; status=1; return; fi
    echo "=== [$limit s, at $SECONDS s] $*"
    timeout "$limit" "$@" || { echo "!!! $* ended with $?"; status=1; }
}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
part 150 python3 setup.py -q build_ext --inplace
for name in ${PARTS:-ops peers tests mfu fusion 7b}; do
    case $name in
    ops) part 90 python3 bench/ops_cuda_check.py --no-build ;;
    peers)
        profiles=$(mktemp -d)
        part 230 env SHAPES=16x2048 PROFILE_DIR="$profiles" bash bench/gpu_peers.sh "$OUT/peers_16x2048"
        for table in "$profiles"/*/*.txt; do
            [[ -f $table ]] && { echo "##### $(basename "$(dirname "$table")")"; cat "$table"; }
        done > "$OUT/peers_16x2048/profiles.txt" ;;
    tests) part 120 python3 -m pytest -q -p no:cacheprovider tests/model/test_cuda.py tests/distributed/test_cuda.py \
        tests/parallel/test_cuda.py tests/training/test_host_syncs.py::test_cuda_iterations_that_do_not_log_never_synchronise ;;
    mfu) part 120 python3 bench/pretrain.py --rounds 1 ;;
    fusion) part 100 python3 bench/grad_accumulation_fusion.py --rounds 1 --iters 10 \
        --json "$OUT/grad_accumulation_fusion.json" ;;
    # Each side builds ~3.7B parameters (17 blocks on an H200) and torchtitan compiles them: 150 s
    # was too little for the three; six iterations keep three timed.
    7b) part 300 env SHAPES=7b-cut-s2048 ITERS=6 bash bench/gpu_peers.sh "$OUT/peers_7b_cut" ;;
    *) echo "!!! unknown part $name (ops, peers, tests, mfu, fusion, 7b)"; status=1 ;;
    esac
done
echo "=== done at $SECONDS s"
exit $status
