#!/usr/bin/env bash
# The single-GPU measurements the README's hardware record still lacks, in one device call:
#   1. ring split efficiency and dispatch host overhead with the one-kernel Triton merge (performance targets);
#   2. _native_efficient alone and under ring on the GPU (its dense-K/V fix);
#   3. context parallelism with 3 and 4 ranks on one GPU over gloo;
#   4. 'auto' against each provider it chooses among, per shape (kernels suite).
# With two GPUs or more, 1 (timed) runs on GPU 0 while 2 and 3 (correctness only) run on GPU 1.
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
    step 240 python -m benchmarks.run --suite gpu --only ring_split overhead --split-providers flash _native_cudnn \
        --out "$out" --tag ring_split_merge_kernel
    step 200 python -m benchmarks.run --suite gpu --only kernels --providers auto flash _native_cudnn _native_flash \
        --seqs 2048 4096 16384 --out "$out" --tag kernels_auto
}
checks() {
    step 120 python benchmarks/gpu_check.py --providers _native_efficient --cp-worlds 2 \
        --cp-providers _native_efficient --out "$out" --tag _efficient
    step 180 python benchmarks/gpu_check.py --providers none --cp-worlds 3 \
        --cp-providers native _native_cudnn flash --out "$out" --tag _w3
    step 180 python benchmarks/gpu_check.py --providers none --cp-worlds 4 \
        --cp-providers native _native_cudnn flash --out "$out" --tag _w4
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
