"""Where FlashAttention-4's host time goes per call, through cpattn and around it (one GPU).

    python benchmarks/flash_host_time.py [--out benchmarks/results] [--tag TAG]

Host time per call (median of alternating calls, the GPU drained every 32) of flash_attn_func on contiguous
(B, S, H, D) tensors, on transpose views of (B, H, S, D) tensors (what dispatch hands it), of dispatch itself
and of the provider's cached runner alone; then cProfile's top functions of the views call and of the dispatch
call. A small causal shape, so the host sets the pace. Writes flash_host_time<TAG>.json.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cpattn  # noqa: E402
from cpattn.dispatch import call_signature  # noqa: E402


def per_call_us(fns: dict, n: int = 1000) -> dict:
    times = {name: [] for name in fns}
    for i in range(n):
        if i % 32 == 0:
            torch.cuda.synchronize()
        for name, fn in fns.items():
            t0 = time.perf_counter_ns()
            fn()
            times[name].append(time.perf_counter_ns() - t0)
    torch.cuda.synchronize()
    return {name: statistics.median(t) / 1e3 for name, t in times.items()}


def top_functions(fn, n_calls: int = 200, top: int = 15) -> list[dict]:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n_calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # by own time
    return [{"function": f"{os.path.basename(k[0])}:{k[1]}:{k[2]}", "calls_per_call": v[1] / n_calls,
             "own_us_per_call": v[2] / n_calls * 1e6, "cum_us_per_call": v[3] / n_calls * 1e6} for k, v in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    from flash_attn.cute import flash_attn_func

    q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    fns = {
        "contiguous_bshd": lambda: flash_attn_func(qs, ks, vs, causal=True)[0],
        "transpose_views": lambda: flash_attn_func(qt, kt, vt, causal=True)[0],
        "dispatch": lambda: cpattn.attention_dispatch(q, k, v, is_causal=True),
    }
    with cpattn.attention_provider("flash"):
        for fn in fns.values():
            for _ in range(50):
                fn()
        provider = cpattn.get_provider("flash")
        runner = provider.accepted_runner(call_signature(q, k, v, None, 0.0, True, None, False))
        fns["cached_runner"] = lambda: runner(q, k, v, None)
        rounds = [per_call_us(fns) for _ in range(3)]
        result = {
            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "flash": provider.availability().version, "date": time.strftime("%Y-%m-%d %H:%M"),
            "shape_bhsd": list(q.shape), "host_us_p50_per_round": rounds,
            "profile_transpose_views": top_functions(fns["transpose_views"]),
            "profile_contiguous_bshd": top_functions(fns["contiguous_bshd"]),
            "profile_dispatch": top_functions(fns["dispatch"]),
        }
    for r in rounds:
        print("  ".join(f"{name} {us:.1f} us" for name, us in r.items()))
    for key in ("profile_contiguous_bshd", "profile_transpose_views"):
        print(key)
        for row in result[key][:10]:
            print(f"  {row['own_us_per_call']:7.1f} {row['cum_us_per_call']:7.1f}  {row['function']}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"flash_host_time{args.tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
