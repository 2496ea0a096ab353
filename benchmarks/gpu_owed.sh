#!/usr/bin/env bash
# The GPU measurements the README's hardware record still lacks, in one device call (about 9 minutes):
#   1. ring split efficiency and dispatch host overhead with the one-kernel Triton merge (performance targets);
#   2. _native_efficient alone and under ring on the GPU (its dense-K/V fix);
#   3. context parallelism with 3 and 4 ranks on the one GPU over gloo.
# Each step has its own time limit, so one slow step cannot take the others' results with it.
# Run after the optional wheels are installed (../shared/gpu/fetch-wheels.sh); results go to $OUT if set.
set -u
out=${OUT:-benchmarks/results}
mkdir -p "$out"
step() {
    local limit=$1; shift
    echo "== $* (limit ${limit}s)"
    timeout "$limit" "$@"
    local code=$?
    [ "$code" = 0 ] || echo "!! exit $code: $*"
}
step 170 python -m benchmarks.run --suite gpu --only ring_split overhead --split-providers flash _native_cudnn \
    --out "$out" --tag ring_split_merge_kernel
step 120 python benchmarks/gpu_check.py --providers _native_efficient --cp-worlds 2 \
    --cp-providers _native_efficient --out "$out" --tag _efficient
step 120 python benchmarks/gpu_check.py --providers none --cp-worlds 3 \
    --cp-providers native _native_cudnn flash --out "$out" --tag _w3
step 120 python benchmarks/gpu_check.py --providers none --cp-worlds 4 \
    --cp-providers native _native_cudnn flash --out "$out" --tag _w4
