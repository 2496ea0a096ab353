#!/usr/bin/env bash
# The single-GPU measurements the README's hardware record still lacks, in one device call:
#   1. the Triton merge (cpattn/ops/merge_kernel.py) and gradient add (cpattn/ops/gradsum_kernel.py) on CUDA tensors:
#      merge against merge_two, in place and into new storage, with the result dtype's rounding checked against
#      torch's cast; the add bit for bit against torch;
#   2. correctness of the ring that uses them: ring, Ulysses and all-gather with 2 and 3 ranks on this GPU over
#      gloo, forward and backward, against float64;
#   3. ring split efficiency at S=64k (whole and split in alternating rounds) and where the split's time goes,
#      GPU idle gaps included.
# `bash benchmarks/gpu_owed.sh checks` runs steps 1-2, `... timed` step 3, `... noncausal` step 3's efficiency
# without a mask, `... auto` the auto-provider suite, `... dispatch` the cached-call checks, host overhead and
# S = 2k / 4k through dispatch, `... overhead` host overhead three times, `... kernels` FA4 and cuDNN through
# dispatch at S = 2k, 4k, 16k, `... matrix` every provider x schedule at the world sizes in $MATRIX_WORLDS (`... matrix_parallel`: 2, 3 and 4 at once),
# `... split` the ring split at 64k three times, `... streams` the ring backward on one and two streams, `... direct`
# FA4's direct launches against the library (tests/gpu/fa4_direct_check.py) and the ring split with either forward, `... record_kernels` / `... record_auto` a GPU's overhead, kernels
# and auto record with call-by-call timing, `... fuzz` random draws through every provider (seed $FUZZ_SEED, default
# 3), `... padded_dims` auto against each candidate at head dims FA4 pads on sm90 (48, 80, 112), `... cp_worlds` ring,
# Ulysses and all-gather over FA4, cuDNN and the efficient kernel at world sizes 2, 3 and 4 (`... cp_head_dims`: FA4
# at head dims 80 and 104); several names run those
# steps in order (one device call is too short for all); no argument:
# checks and timed.
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
matrix() {  # every provider x schedule it claims, world sizes MATRIX_WORLDS (default 1 2 3 4), one JSON per call
    local worlds=${MATRIX_WORLDS:-1 2 3 4}
    step 580 python benchmarks/gpu_check.py --providers none --cp-matrix --cp-worlds $worlds --out "$out" \
        --tag "_matrix_w${worlds// /}"
}
matrix_parallel() {  # the matrix at world sizes 2, 3 and 4 at once (W=4 in two provider groups), one log each,
    # tagged $MATRIX_TAG (default _matrix):
    # ranks on one GPU over gloo spend their time on host staging, so four jobs fit one call where one after
    # another took three
    local check="python benchmarks/gpu_check.py --providers none --cp-matrix --out $out" tag=${MATRIX_TAG:-_matrix}
    timeout 570 $check --cp-worlds 2 --tag "${tag}_w2" > "$out/${tag#_}_w2.log" 2>&1 &
    timeout 570 $check --cp-worlds 3 --tag "${tag}_w3" > "$out/${tag#_}_w3.log" 2>&1 &
    timeout 570 $check --cp-worlds 4 --cp-providers native _native_math _native_flash _native_efficient \
        _native_cudnn flash flash_varlen --tag "${tag}_w4a" > "$out/${tag#_}_w4a.log" 2>&1 &
    timeout 570 $check --cp-worlds 4 --cp-providers flex sage sage_varlen xformers --tag "${tag}_w4b" \
        > "$out/${tag#_}_w4b.log" 2>&1 &
    wait
    for log in "$out/${tag#_}"_w*.log; do
        echo "== $log: $(grep -c ' ok$' "$log") ok"
        grep -E "FAIL|refused|cases in|Traceback" "$log" | head -20
    done
}
direct() {  # FA4's directly launched sm90 kernels against the library's functions, then the ring split both ways
    step 420 python tests/gpu/fa4_direct_check.py --out "$out" --tag _"${DIRECT_TAG:-run}"
    step 240 python benchmarks/fa4_forward_probe.py --out "$out" --tag _"${DIRECT_TAG:-run}"
}
kernel_checks() {
    step 180 python tests/support/merge_kernel_check.py --cuda  # first Triton compiles on a fresh machine
    step 60 python tests/support/gradsum_kernel_check.py --cuda
}
dispatch() {  # the cached-call path: correctness on the real kernels, host overhead (three runs), S=2k and 4k
    step 150 python benchmarks/gpu_check.py --providers flash _native_cudnn auto --cp-worlds --out "$out" \
        --tag _flash_runner
    for run in 1 2 3; do
        step 60 python -m benchmarks.run --suite gpu --only overhead --out "$out" --tag overhead_flash_runner_r$run
    done
    step 240 python -m benchmarks.run --suite gpu --only kernels --providers flash _native_cudnn --seqs 2048 4096 \
        --rounds 7 --out "$out" --tag kernels_flash_runner
}
auto() {
    step 420 python -m benchmarks.run --suite gpu --only auto --out "$out" --tag auto_balanced
}
overhead() {  # three runs: the host's own speed moves the direct call by 50% between runs
    for run in 1 2 3; do
        step 60 python -m benchmarks.run --suite gpu --only overhead --out "$out" --tag overhead_session_end_r$run
    done
}
kernels() {
    step 420 python -m benchmarks.run --suite gpu --only kernels --providers flash _native_cudnn \
        --seqs 2048 4096 16384 --rounds 7 --out "$out" --tag kernels_final
}
noncausal() {
    step 300 python -m benchmarks.run --suite gpu --only ring_split --split-seqs 65536 --split-causal noncausal \
        --split-providers flash _native_cudnn --out "$out" --tag ring_split_noncausal_owner
}
timed() {
    step 230 python -m benchmarks.run --suite gpu --only ring_split --split-seqs 65536 \
        --split-providers flash _native_cudnn --out "$out" --tag ring_split_owner
    step 100 python benchmarks/ring_profile.py --seqs 65536 --out "$out" --tag ring_profile_owner
}
split() {  # ring split at S=64k, P=4: twice call by call, once in rounds (the two timings differ by up to 3%)
    for run in 1 2; do
        step 200 python -m benchmarks.run --suite gpu --only ring_split --split-seqs 65536 --split-parts 4 \
            --split-providers flash _native_cudnn --timing interleaved --out "$out" --tag ring_split_interleaved_r$run
    done
    step 200 python -m benchmarks.run --suite gpu --only ring_split --split-seqs 65536 --split-parts 4 \
        --split-providers flash _native_cudnn --out "$out" --tag ring_split_rounds
}
record_kernels() {  # a GPU's record with the current code: host overhead three times, FA4 and cuDNN call by call
    overhead
    step 400 python -m benchmarks.run --suite gpu --only kernels --providers flash _native_cudnn \
        --seqs 2048 4096 16384 --timing interleaved --out "$out" --tag kernels_interleaved
}
record_auto() {
    step 500 python -m benchmarks.run --suite gpu --only auto --timing interleaved --out "$out" --tag auto_interleaved
}
fuzz() {
    step 420 python benchmarks/gpu_fuzz.py --seconds-per-provider 25 --seed "${FUZZ_SEED:-3}" --out "$out" \
        --tag "_seed${FUZZ_SEED:-3}"
}
padded_dims() {  # FA4 pads these head dims for its sm90 backward: is it still the fastest, as auto assumes?
    step 420 python -m benchmarks.run --suite gpu --only auto --head-dims 48 80 112 --auto-seqs 16384 \
        --timing interleaved --out "$out" --tag auto_padded_dims
}
cp_head_dims() {  # the same at head dims FA4 pads on sm90 (80: backward to 96; 104: both ways to 128)
    step 560 python benchmarks/gpu_check.py --providers none --cp-worlds 2 3 4 --cp-providers flash \
        --cp-head-dims 80 104 --out "$out" --tag _cp_head_dims
}
cp_worlds() {
    step 560 python benchmarks/gpu_check.py --providers none --cp-worlds 2 3 4 \
        --cp-providers flash _native_cudnn _native_efficient --out "$out" --tag _cp_w234
}
streams() {  # the ring backward on one and on two streams (cpattn/cp/streams.py): block kernels alone, the ring
    # split at P=2/4/8 for FA4 and cuDNN, and reserved memory with kept against new streams per call
    step 120 python benchmarks/step_streams_probe.py --out "$out" --tag _"${STREAMS_TAG:-run}"
    step 300 python benchmarks/step_streams_probe.py --ring --ring-parts 2 4 8 --ring-providers flash _native_cudnn \
        --rounds 6 --out "$out" --tag _"${STREAMS_TAG:-run}"
    step 120 python benchmarks/step_streams_probe.py --reserved 24 --out "$out" --tag _"${STREAMS_TAG:-run}"
}
checks() {
    kernel_checks
    step 200 python benchmarks/gpu_check.py --providers none --cp-worlds 2 3 --cp-providers native _native_cudnn flash \
        --out "$out" --tag _owner
}
if [ $# -gt 0 ]; then  # the steps named, in order
    for mode in "$@"; do
        case "$mode" in
            checks|timed|noncausal|auto|dispatch|overhead|kernels|matrix|matrix_parallel|split|streams|direct|record_kernels|record_auto|fuzz|padded_dims|cp_worlds|cp_head_dims) "$mode" ;;
            *) echo "unknown step: $mode (checks, timed, noncausal, auto, dispatch, overhead, kernels, matrix,"\
                    "matrix_parallel, split, streams, direct,"\
                    "record_kernels, record_auto, fuzz, padded_dims, cp_worlds, cp_head_dims)"
               exit 2 ;;
        esac
    done
    exit 0
fi
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    CUDA_VISIBLE_DEVICES=0 timed > "$out/owed_timed.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 checks > "$out/owed_checks.log" 2>&1 &
    wait
    cat "$out/owed_timed.log" "$out/owed_checks.log"
else
    checks
    timed
fi
