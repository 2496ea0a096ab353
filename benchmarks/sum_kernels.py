"""Memory bandwidth of the ring's end-of-ring Triton passes for a few launch shapes, on one GPU.

    python benchmarks/sum_kernels.py --out benchmarks/results --tag sum_kernels

Each case is what one rank of a 4-rank zigzag ring hands the kernels at S=64k (16k local rows, H=16, D=128):
four bf16 parts in a kernel's transposed (B, S, H, D) layout, two over every row and two over the late half,
summed (`add_parts_into`) or merged with their lse (`merge_blocks_into`) into a bf16 result. Bandwidth counts
the bytes each pass must read and write once; a bf16 copy of the same size calibrates what the GPU gives.
Timed with triton.testing.do_bench (median).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.run import RESULTS, environment  # noqa: E402
from cpattn.ops.gradsum_kernel import TILE_VALUES, WARPS, add_parts_into  # noqa: E402
from cpattn.ops.merge_kernel import merge_blocks_into  # noqa: E402


def inputs(rows: int, heads: int, dim: int):
    def part(n):
        return torch.randn(1, n, heads, dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    def lse(n):
        return torch.randn(1, heads, n, device="cuda") * 3

    half = rows // 2
    parts = [(part(rows), 0), (part(rows), 0), (part(half), half), (part(half), half)]
    blocks = [(p, lse(p.shape[2]), first) for p, first in parts]
    return parts, blocks


def main(argv=None) -> None:
    from triton.testing import do_bench

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default="sum_kernels")
    args = parser.parse_args(argv)
    heads, dim = 16, 128
    parts, blocks = inputs(args.rows, heads, dim)
    out = torch.empty(1, heads, args.rows, dim, device="cuda", dtype=torch.bfloat16)
    out_lse = torch.empty(1, heads, args.rows, device="cuda")
    part_bytes = sum(p.numel() * p.element_size() for p, _ in parts)
    lse_bytes = sum(x.numel() * 4 for _, x, _ in blocks) + out_lse.numel() * 4
    add_bytes = part_bytes + out.numel() * 2
    merge_bytes = add_bytes + lse_bytes
    src = torch.randn_like(out)
    copy_ms = do_bench(lambda: out.copy_(src))
    rows = [{"case": "bf16 copy", "tile_values": None, "warps": None, "ms": copy_ms,
             "gb_per_s": 2 * out.numel() * 2 / copy_ms / 1e6}]
    for tile_values, warps in itertools.product((2048, 4096, 8192, 16384), (4, 8, 16)):
        add_ms = do_bench(lambda: add_parts_into(out, parts, tile_values, warps))
        merge_ms = do_bench(lambda: merge_blocks_into(out, out_lse, blocks, tile_values, warps))
        for case, ms, nbytes in (("add 4 parts", add_ms, add_bytes), ("merge 4 blocks", merge_ms, merge_bytes)):
            rows.append({"case": case, "tile_values": tile_values, "warps": warps, "ms": ms,
                         "gb_per_s": nbytes / ms / 1e6, "default": (tile_values, warps) == (TILE_VALUES, WARPS)})
    for r in rows:
        print(f"{r['case']:<16}{str(r['tile_values']):>7}{str(r['warps']):>4}  {r['ms'] * 1e3:8.1f} us "
              f"{r['gb_per_s']:8.0f} GB/s{'  (default)' if r.get('default') else ''}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.tag}.json")
    with open(path, "w") as f:
        json.dump({"environment": environment(), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": args.rows,
                   "heads": heads, "dim": dim, "cases": rows}, f, indent=1, default=str)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
