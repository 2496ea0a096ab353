"""Run by tests/unit/test_merge_kernel.py in a process with TRITON_INTERPRET=1: decode's combine kernels
(cpattn/ops/merge_kernel.py `pack_partial`, `merge_packed`) on CPU tensors against `merge_stacked`, over the
number of partials, head dims, output dtypes, empty partials (lse -inf) and rows no partial covers. With --cuda
(on a GPU): the same cases on CUDA tensors, compiled."""

from __future__ import annotations

import itertools
import os
import sys

import torch

CUDA = "--cuda" in sys.argv
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1, or with --cuda on a GPU"
DEVICE = "cuda" if CUDA else "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cpattn.ops.merge import merge_stacked  # noqa: E402
from cpattn.ops import merge_kernel  # noqa: E402
from cpattn.ops.merge_kernel import SPREAD_PROGRAMS, merge_packed, pack_partial  # noqa: E402


def case(parts: int, dim: int, dtype: torch.dtype, empty: str, seed: int) -> str | None:
    gen = torch.Generator().manual_seed(seed)
    b, h, s = 2, 3, 5
    outs = [torch.randn(b, h, s, dim, generator=gen).to(dtype) for _ in range(parts)]
    lses = [3 * torch.randn(b, h, s, generator=gen) for _ in range(parts)]
    if empty == "one partial":  # a rank whose slice has no keys
        outs[0].zero_()
        lses[0].fill_(float("-inf"))
    elif empty == "some rows":  # rows no partial covers
        for o, lse in zip(outs, lses):
            o[:, :, 1].zero_()
            lse[:, :, 1] = float("-inf")
    outs = [o.to(DEVICE) for o in outs]
    lses = [x.to(DEVICE) for x in lses]
    packed = [pack_partial(o, x) for o, x in zip(outs, lses)]
    for p, o, x in zip(packed, outs, lses):
        if not (torch.equal(p[..., :-1], o.float()) and torch.equal(p[..., -1], x)):
            return "pack_partial differs from (out.float(), lse)"
    want_out, want_lse = merge_stacked(torch.stack(outs), torch.stack(lses))
    for out_dtype in (torch.float32, dtype):
        got_out, got_lse = merge_packed(torch.stack(packed), out_dtype)
        if got_out.dtype != out_dtype or got_out.isnan().any() or got_lse.isnan().any():
            return f"{out_dtype}: wrong dtype or NaN"
        if not torch.equal(got_lse.isneginf(), want_lse.isneginf()):
            return "rows without keys differ"
        finite = want_lse.isfinite()
        if finite.any() and (got_lse[finite] - want_lse[finite]).abs().max() > 1e-5:
            return "lse differs"
        tol = 1e-5 if out_dtype == torch.float32 else 1e-2
        if (got_out.float() - want_out.to(out_dtype).float()).abs().max() > tol:
            return f"out in {out_dtype} differs"
        if not (got_out[~finite] == 0).all():
            return "rows without keys are not 0"
    return None


def main() -> None:
    failed, total = [], 0
    merge_kernel.SPREAD_PROGRAMS = 1 if CUDA else 4
    for parts, dim, dtype, empty in itertools.product((1, 2, 3, 8), (8, 72, 128), (torch.bfloat16, torch.float16),
                                                      ("none", "one partial", "some rows")):
        total += 1
        problem = case(parts, dim, dtype, empty, seed=total)
        if problem:
            failed.append(f"parts={parts} dim={dim} {dtype} empty={empty}: {problem}")
    # merge_kernel's launch as it is: these 30 rows one per program. The cases above run 8 rows per program over 4
    # programs, the last one cut short, under the interpreter (30 programs each take it minutes), and the largest
    # tile on CUDA.
    merge_kernel.SPREAD_PROGRAMS = SPREAD_PROGRAMS
    for parts, dim in itertools.product((2, 8), (72, 128)):
        total += 1
        problem = case(parts, dim, torch.bfloat16, "some rows", seed=total)
        if problem:
            failed.append(f"one row per program: parts={parts} dim={dim}: {problem}")
    for line in failed:
        print("FAIL", line)
    print(f"checked {total} cases, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
