#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one device call that fits its 10-minute command limit:
# the CUDA checks (bench/gpu_check.sh: kernels, CUDA tests with the sync debugger, MFU), then the
# side-by-side run against torchtitan and megatron-core on the 16×2048 shape (bench/gpu_peers.sh;
# needs .whl/ from `make peer-wheels` in the call's carry), then the 7B cuts while time is left.
# Each part has its own time bound, so a slow part costs only itself. Output under OUT_DIR
# (the console too: gpu_session.txt).
# Usage from the repo root: bash bench/gpu_session.sh [OUT_DIR]   (default $OUT, else bench/results)
set -uo pipefail
OUT=${1:-${OUT:-bench/results}}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_session.txt") 2>&1
status=0
part() { local limit=$1; shift; echo "=== [$limit s] $*"; timeout "$limit" "$@" || { echo "!!! $* ended with $?"; status=1; }; }
part 240 bash bench/gpu_check.sh "$OUT/gpu_check"
part 180 env SHAPES=16x2048 bash bench/gpu_peers.sh "$OUT/peers_16x2048"
part 150 env SHAPES="7b-cut-s2048 7b-cut-s4096" bash bench/gpu_peers.sh "$OUT/peers_7b_cut"
exit $status
