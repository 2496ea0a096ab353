"""FlashAttention-4 forward+backward timed with each tensor in (B, S, H, D) storage or as a transpose view of
(B, H, S, D) storage (what dispatch hands it): which layout, if any, changes the kernels' time.

    python benchmarks/flash_layout.py [--out benchmarks/results] [--tag TAG] [--rounds 9] [--timing interleaved]

Variants, each timed with triton's do_bench in balanced rounds (benchmarks.run.bench_alternating), or call by call
taking turns (benchmarks.run.bench_interleaved) with --timing interleaved:
  bshd        q, k, v and dout contiguous (B, S, H, D): the direct call of the kernels suite
  views       q, k, v and dout transpose views of (B, H, S, D): the dispatch call's layout
  views_dout_bshd  q, k, v views, dout contiguous (B, S, H, D)
  bshd_dout_view   q, k, v contiguous, dout a view
  dispatch    attention_dispatch on the (B, H, S, D) tensors with provider "flash"
  bshd_fwd, views_fwd, dispatch_fwd: the forward alone, without gradients
Writes flash_layout<TAG>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.run import bench_functions  # noqa: E402

SHAPES = [(64, 2048, True), (64, 2048, False), (128, 2048, True), (64, 4096, True)]  # (D, S, causal); B*H*S = 16 * 16384


def variants(d: int, s: int, causal: bool) -> dict:
    from flash_attn.cute import flash_attn_func

    h = 16
    b = 16 * 16384 // (h * s)
    bhsd = [torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    views = [t.transpose(1, 2) for t in bhsd]
    dense = [t.contiguous() for t in views]

    def fwd_bwd(qkv, dout):
        q, k, v = (t.detach().requires_grad_() for t in qkv)

        def run():
            flash_attn_func(q, k, v, causal=causal)[0].backward(dout)
        return run

    def through_dispatch(backward):
        import cpattn

        q, k, v = (t.detach().requires_grad_(backward) for t in bhsd[:3])

        def run():
            with cpattn.attention_provider("flash"):
                out = cpattn.attention_dispatch(q, k, v, is_causal=causal)
            if backward:
                out.backward(bhsd[3])
        return run

    def forward(qkv):
        return lambda: flash_attn_func(*qkv, causal=causal)
    return {
        "bshd": fwd_bwd(dense[:3], dense[3]),
        "views": fwd_bwd(views[:3], views[3]),
        "views_dout_bshd": fwd_bwd(views[:3], dense[3]),
        "bshd_dout_view": fwd_bwd(dense[:3], views[3]),
        "dispatch": through_dispatch(True),
        "bshd_fwd": forward(dense[:3]),
        "views_fwd": forward(views[:3]),
        "dispatch_fwd": through_dispatch(False),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--timing", choices=("rounds", "interleaved"), default="rounds")
    args = parser.parse_args()
    rows = []
    for d, s, causal in SHAPES:
        times = bench_functions(variants(d, s, causal), args.timing, args.rounds)
        row = {"D": d, "S": s, "causal": causal, "timing": args.timing,
               "round_medians_ms": {n: t["round_medians_ms"] for n, t in times.items()},
               "median_ms": {n: t["median_ms"] for n, t in times.items()}}
        rows.append(row)
        print(f"D={d} S={s} causal={causal}: " + ", ".join(f"{n} {t:.3f}" for n, t in row["median_ms"].items()))
        for n, r in row["round_medians_ms"].items():
            print(f"    {n:16s} " + " ".join(f"{x:.3f}" for x in r))
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"flash_layout{args.tag}.json")
    with open(path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
