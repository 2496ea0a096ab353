#!/usr/bin/env bash
# The single-GPU measurements the README's hardware record still lacks, in one device call:
#   1. correctness of 'auto' with its fixed order and with autotune=True (FA4 and cuDNN alongside), each case
#      dispatched twice so the cached runner is checked too;
#   2. 'auto' with autotune=True against every provider it chooses among (alternating rounds);
#   3. ring split efficiency at S=64k with whole and split timed in alternating rounds;
#   4. dispatch host overhead, twice (it varies from run to run on a shared host).
# With two GPUs or more, the correctness check runs on GPU 1 while the timed steps run on GPU 0.
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
    step 300 python -m benchmarks.run --suite gpu --only auto --out "$out" --tag auto_tuned_margin
    step 200 python -m benchmarks.run --suite gpu --only ring_split --split-seqs 65536 \
        --split-providers flash _native_cudnn --out "$out" --tag ring_split_alternating
    for run in 1 2; do
        step 60 python -m benchmarks.run --suite gpu --only overhead --out "$out" --tag "overhead_autotune_r$run"
    done
}
checks() {
    step 180 python benchmarks/gpu_check.py --providers auto flash _native_cudnn --cp-worlds --out "$out" \
        --tag _auto
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
