#!/usr/bin/env bash
# The single-GPU measurements the README's hardware record still lacks, in one device call:
#   1. dispatch host overhead with cached runners, and ring split efficiency with accumulators that start from
#      their first block (performance targets), at least 10 timed runs per case;
#   2. correctness after those changes: ring, Ulysses and all-gather with 2 and 3 ranks on this GPU over gloo.
# With two GPUs or more, 1 (timed) runs on GPU 0 while 2 (correctness only) runs on GPU 1.
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
timed() {
    step 300 python -m benchmarks.run --suite gpu --only ring_split overhead --split-providers flash _native_cudnn \
        --out "$out" --tag ring_split_min10
}
checks() {
    step 240 python benchmarks/gpu_check.py --providers none --cp-worlds 2 3 --cp-providers native _native_cudnn flash \
        --out "$out" --tag _ring_accumulators
}
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    CUDA_VISIBLE_DEVICES=0 timed > "$out/owed_timed.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 checks > "$out/owed_checks.log" 2>&1 &
    wait
    cat "$out/owed_timed.log" "$out/owed_checks.log"
else
    timed
    checks
fi
