"""Where a ring split's time goes on one GPU: host time to issue it, GPU kernel time, and the host's top ops.

    python benchmarks/ring_profile.py --providers flash _native_cudnn --seqs 16384 65536 --parts 4

For each case, one split (all P ranks' block kernels and merges, no communication; see benchmarks/run.py)
runs under torch.profiler after warm-up. When the host time to issue the work is close to the split's wall
time, the GPU waits on Python and launch overhead; when kernel time is close to it, the kernels themselves
(or extra copies and merges, listed by name) cost the difference to one whole-sequence call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.run import RESULTS, bench_gpu, host_ms, ring_split_case, write_cases  # noqa: E402


def profile_case(provider: str, s: int, p: int, backward: bool, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    whole, split = ring_split_case(provider, s, p, backward)
    row = {"provider": provider, "S": s, "P": p, "backward": backward}
    row["whole_ms"] = bench_gpu(whole)["median_ms"]
    row["split_ms"] = bench_gpu(split)["median_ms"]
    row["split_host_ms"] = host_ms(split)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        split()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    row["kernel_ms"] = sum(e.self_device_time_total for e in kernels) / 1e3
    row["kernel_launches"] = sum(e.count for e in kernels)
    row["top_kernels"] = [{"name": e.key[:90], "count": e.count, "ms": e.self_device_time_total / 1e3}
                          for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]]
    cpu = [e for e in events if e.device_type.name == "CPU"]
    row["top_host_ops"] = [{"name": e.key[:90], "count": e.count, "self_ms": e.self_cpu_time_total / 1e3}
                           for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:top]]
    row.update(gpu_idle(prof, top))
    row["kernel_sequence"] = kernel_sequence(prof)
    with profile(activities=[ProfilerActivity.CUDA]) as whole_prof:  # the same measure of the whole call
        whole()
        torch.cuda.synchronize()
    whole_kernels = [e for e in whole_prof.key_averages() if e.device_type.name == "CUDA"]
    row["whole_kernel_ms"] = sum(e.self_device_time_total for e in whole_kernels) / 1e3
    row["whole_top_kernels"] = [{"name": e.key[:90], "count": e.count, "ms": e.self_device_time_total / 1e3}
                                for e in sorted(whole_kernels, key=lambda e: -e.self_device_time_total)[:top]]
    row["whole_gpu_span_ms"] = gpu_idle(whole_prof, 0).get("gpu_span_ms")
    row["top_python"] = python_profile(split, top)
    return row


def kernel_sequence(prof) -> list[list]:
    """Every kernel of the trace in start order, as [name (60 characters), microseconds]: which block call or
    merge took how long."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type.name == "CUDA")
    return [[name[:60], end - start] for start, end, name in spans]


def gpu_idle(prof, top: int, exclude=None) -> dict:
    """From the trace: the time between the split's first kernel start and last kernel end in which no kernel
    ran, and its largest gaps with the kernels on either side (the GPU waiting on the host, or launch latency).
    `exclude(name)`: kernels left out of the count (NCCL's, which span a whole transfer on their own stream)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type.name == "CUDA" and not (exclude and exclude(e.name)))
    if not spans:
        return {}
    gaps, busy_until, before = [], spans[0][1], spans[0][2]
    for start, end, name in spans[1:]:
        if start > busy_until:
            gaps.append((start - busy_until, before[:60], name[:60]))
        if end > busy_until:
            busy_until, before = end, name
    idle = sum(g for g, _, _ in gaps)
    return {"gpu_span_ms": (busy_until - spans[0][0]) / 1e3, "gpu_idle_ms": idle / 1e3, "gpu_gaps": len(gaps),
            "largest_gaps": [{"us": g, "after": a, "before": b} for g, a, b in sorted(gaps, reverse=True)[:top]]}


def python_profile(fn, top: int, repeats: int = 5) -> list[dict]:
    """The Python functions where issuing `fn` spends its host time (cProfile, own time per call of `fn`)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(repeats):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, own, cumulative, callers)
    rows = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return [{"function": f"{os.path.basename(f)}:{line}:{name}", "calls_per_run": calls / repeats,
             "own_ms_per_run": own / repeats * 1e3, "cum_ms_per_run": cum / repeats * 1e3}
            for (f, line, name), (calls, _, own, cum, _) in rows]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", nargs="*", default=["flash", "_native_cudnn"])
    parser.add_argument("--seqs", type=int, nargs="*", default=[16384, 65536])
    parser.add_argument("--parts", type=int, nargs="*", default=[4])
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default="ring_profile")
    args = parser.parse_args(argv)
    rows = []
    for provider in args.providers:
        for s in args.seqs:
            for p in args.parts:
                for backward in (False, True):
                    try:
                        row = profile_case(provider, s, p, backward, args.top)
                    except Exception as exc:  # record, keep going
                        row = {"provider": provider, "S": s, "P": p, "backward": backward,
                               "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    rows.append(row)
                    print(json.dumps(row, indent=1), flush=True)
                    torch.cuda.empty_cache()
    print(f"wrote {write_cases(args.out, args.tag, rows)}")


if __name__ == "__main__":
    main()
