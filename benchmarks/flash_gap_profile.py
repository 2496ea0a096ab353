"""Where the time of FA4 at D=64, S=2k, causal goes: kernel time (profiler) against call time (CUDA events).

    python benchmarks/flash_gap_profile.py [--out DIR]   (on a GPU with flash-attn-4; writes flash_gap_profile.json)

Variants as in benchmarks/flash_layout.py: FA4 on views of (B, H, S, D) tensors, and attention_dispatch with
provider "flash" on the same tensors; forward alone and forward+backward. Blocks of calls alternate between
the variants (A B A B ...), each call after an L2 flush; the profiler records every kernel's device time, the
events each call's time. When a variant's call time exceeds its kernels' time, the GPU waited within the call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


D, S, CAUSAL, H = 64, 2048, True, 16
B = 16 * 16384 // (H * S)  # as flash_layout sizes the batch


def variants() -> dict:
    """flash_layout's variants at this shape: FA4 on views and through dispatch, forward alone and with backward."""
    from benchmarks.flash_layout import variants as layout_variants

    every = layout_variants(D, S, CAUSAL)
    return {name: every[name] for name in ("views_fwd", "dispatch_fwd", "views", "dispatch")}


def profile_block(fn, calls: int, cache) -> tuple[list[float], float, int]:
    """(call times in ms from events, kernel device time per call in ms, kernels per call), flush excluded."""
    from torch.profiler import ProfilerActivity, profile

    pairs = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            cache.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "fill" not in e.name.lower() and "memset" not in e.name.lower()]
    device_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / calls
    return [s.elapsed_time(e) for s, e in pairs], device_ms, round(len(kernels) / calls, 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    fns = variants()
    cache = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for fn in fns.values():  # compile and warm up
        for _ in range(20):
            fn()
    torch.cuda.synchronize()
    rows = {name: {"call_ms": [], "kernel_ms": [], "kernels_per_call": []} for name in fns}
    for block in range(args.blocks):
        for name in (list(fns) if block % 2 == 0 else list(fns)[::-1]):
            calls, device_ms, per_call = profile_block(fns[name], args.calls, cache)
            rows[name]["call_ms"].append(statistics.median(calls))
            rows[name]["kernel_ms"].append(device_ms)
            rows[name]["kernels_per_call"].append(per_call)
    for name, r in rows.items():
        r["median_call_ms"] = statistics.median(r["call_ms"])
        r["median_kernel_ms"] = statistics.median(r["kernel_ms"])
        print(f"{name:14s} call {r['median_call_ms']:.4f} ms, kernels {r['median_kernel_ms']:.4f} ms per call "
              f"({r['kernels_per_call'][0]} kernels); blocks: call "
              + " ".join(f"{x:.3f}" for x in r["call_ms"]) + " | kernels " + " ".join(f"{x:.3f}" for x in r["kernel_ms"]),
              flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "flash_gap_profile.json")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "shape": {"B": B, "H": H, "S": S, "D": D, "causal": CAUSAL},
                   "variants": rows}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
