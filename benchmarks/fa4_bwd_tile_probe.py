"""Would one dQ accumulator per ring rank pay on Hopper? FA4's backward on a ring's non-causal blocks with the
library's tile against the causal tile.

    python benchmarks/fa4_bwd_tile_probe.py [--out DIR] [--tag TAG]

Every FA4 backward call zeroes a float32 dQ accumulator and computes dO . out per row (preprocess), and turns the
accumulator into dQ (postprocess); a ring backward at W=4 makes four calls per rank, so it pays those passes four
times and then sums four dQ parts. One accumulator kept across a rank's calls would pay them once, but only if
every call stores its accumulator in the same tile order. On sm90 at head dim 128, flash_attn.cute 4.0.0b36 tiles
causal blocks 64 x 128 and non-causal ones 80 x 128 with dQ stored swapped, and a zigzag rank's late rows start at
a row that is not a multiple of 80. So a shared accumulator means running the non-causal blocks on the causal
tile. This probe times exactly that: `_flash_attn_bwd` on the non-causal block shapes of a zigzag ring at S=64k,
W=4 (16k x 8k and 8k x 16k), H=16, D=128, bf16, with the library's tile and with the causal one (the library's
tile-size function patched for the probe), in balanced alternating rounds; and, under the torch profiler, the
time of the main kernel and of the pre/postprocess kernels per call. Writes fa4_bwd_tile_probe<tag>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.run import RESULTS, bench_alternating, write_cases  # noqa: E402


def tile_patch(interface, tile: str):
    """Nothing for the library's tile; for "causal", its sm90 tile-size function answering as for causal."""
    if tile == "library":
        return contextlib.nullcontext()
    original = interface._tile_size_bwd_sm90

    def causal_tile(head_dim, head_dim_v, causal, local, **kwargs):
        return original(head_dim, head_dim_v, True, local, **kwargs)
    return mock.patch.object(interface, "_tile_size_bwd_sm90", causal_tile)


def backward_call(interface, sq: int, sk: int, causal: bool, tile: str, heads=16, dim=128):
    """One FA4 backward of an (sq x sk) block from fresh random inputs in FA4's (B, S, H, D) layout."""
    def rand(s):
        return torch.randn(1, s, heads, dim, device="cuda", dtype=torch.bfloat16)
    q, k, v, out, dout = rand(sq), rand(sk), rand(sk), rand(sq), rand(sq)
    lse = torch.randn(1, heads, sq, device="cuda", dtype=torch.float32) + 10.0

    def run():
        with tile_patch(interface, tile):
            interface._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=dim ** -0.5, causal=causal)
    return run


def kernel_ms(fn, runs: int = 5) -> dict:
    """Per-call GPU time of each kind of kernel `fn` launches (main, preprocess, postprocess), from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            fn()
        torch.cuda.synchronize()
    kinds = {"preprocess": 0.0, "postprocess": 0.0, "main": 0.0, "other": 0.0}
    for event in prof.events():
        if event.device_type.name != "CUDA":
            continue
        name = event.name.lower()
        kind = ("preprocess" if "preprocess" in name else "postprocess" if "postprocess" in name
                else "main" if "flash_bwd" in name else "other")
        kinds[kind] += event.device_time / 1e3 / runs
    return kinds


def main(argv=None) -> None:
    from flash_attn.cute import interface

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    rows = []
    shapes = [(16384, 8192, False), (8192, 16384, False), (16384, 16384, True)]
    for sq, sk, causal in shapes:
        tiles = ("library", "causal") if not causal else ("library",)
        fns = {tile: backward_call(interface, sq, sk, causal, tile) for tile in tiles}
        times = bench_alternating(fns, rounds=6)
        row = {"Sq": sq, "Sk": sk, "causal": causal, "H": 16, "D": 128}
        for tile in tiles:
            row[tile] = times[tile] | {"kernels_ms": kernel_ms(fns[tile])}
        if not causal:
            row["causal_tile_over_library"] = times["causal"]["median_ms"] / times["library"]["median_ms"]
            row["main_kernel_ratio"] = (row["causal"]["kernels_ms"]["main"] / row["library"]["kernels_ms"]["main"])
        rows.append(row)
        print({k: v for k, v in row.items() if k in ("Sq", "Sk", "causal", "causal_tile_over_library",
                                                      "main_kernel_ratio")},
              {t: round(row[t]["median_ms"], 3) for t in tiles},
              {t: {k: round(x, 3) for k, x in row[t]["kernels_ms"].items()} for t in tiles}, flush=True)
    print("wrote", write_cases(args.out, f"fa4_bwd_tile_probe{args.tag}", rows))


if __name__ == "__main__":
    main()
