#!/usr/bin/env bash
# The single-GPU measurements the README's hardware record still lacks, in one device call:
#   1. the Triton gradient add (cpattn/gradsum_kernel.py) bit for bit against torch on CUDA tensors;
#   2. correctness of the ring backward that uses it: ring, Ulysses and all-gather with 2 and 3 ranks on this GPU
#      over gloo, forward and backward, against float64;
#   3. ring split efficiency at S=64k (whole and split in alternating rounds) and where the split's time goes.
# With two GPUs or more, the correctness steps run on GPU 1 while the timed steps run on GPU 0.
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
    step 200 python -m benchmarks.run --suite gpu --only ring_split --split-seqs 65536 \
        --split-providers flash _native_cudnn --out "$out" --tag ring_split_gradsum
    step 120 python benchmarks/ring_profile.py --seqs 65536 --out "$out" --tag ring_profile_gradsum
}
checks() {
    step 60 python tests/gradsum_kernel_check.py --cuda
    step 240 python benchmarks/gpu_check.py --providers none --cp-worlds 2 3 --cp-providers native _native_cudnn flash \
        --out "$out" --tag _gradsum
}
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    CUDA_VISIBLE_DEVICES=0 timed > "$out/owed_timed.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 checks > "$out/owed_checks.log" 2>&1 &
    wait
    cat "$out/owed_timed.log" "$out/owed_checks.log"
else
    checks
    timed
fi
