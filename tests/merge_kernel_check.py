"""Run by tests/test_merge_kernel.py in a process with TRITON_INTERPRET=1: the Triton merge kernel on CPU
tensors (Triton's interpreter) against `merge_two`, over dtypes, head dims, row slices and poisoned rows."""

from __future__ import annotations

import itertools
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpattn.merge import merge_two  # noqa: E402
from cpattn.merge_kernel import merge_into  # noqa: E402


def case(dtype: torch.dtype, dim: int, rows: slice, seed: int) -> str | None:
    """None if the kernel matches merge_two, else what differs."""
    g = torch.Generator().manual_seed(seed)
    b, h, s = 2, 3, 29
    acc_out = torch.randn(b, h, s, dim, generator=g)
    acc_lse = torch.randn(b, h, s, generator=g) * 4
    n = len(range(s)[rows])
    blk_out = torch.randn(b, h, n, dim, generator=g).to(dtype)
    blk_lse = torch.randn(b, h, n, generator=g) * 4
    # Poisoned and empty rows: both empty, one empty, +inf, NaN, and a huge gap between the two lse.
    acc_lse[0, 0, rows][:2] = float("-inf")
    blk_lse[0, 0, :1] = float("-inf")
    blk_lse[0, 1, 1 % n] = float("-inf")
    blk_lse[1, 0, 2 % n] = float("nan")
    acc_lse[1, 1, rows][3 % n] = float("inf")
    blk_lse[1, 2, 4 % n] = 500.0
    want_out, want_lse = merge_two(acc_out[:, :, rows], acc_lse[:, :, rows], blk_out, blk_lse)
    untouched = [acc_out.clone(), acc_lse.clone()]
    merge_into(acc_out[:, :, rows], acc_lse[:, :, rows], blk_out, blk_lse)
    got_out, got_lse = acc_out[:, :, rows], acc_lse[:, :, rows]
    for name, got, want in (("out", got_out, want_out), ("lse", got_lse, want_lse)):
        if not torch.equal(got.isnan(), want.isnan()):
            return f"{name}: NaN in different places"
        if not torch.equal(got.isinf(), want.isinf()) or not torch.equal(got.isinf() & (got > 0), want.isinf() & (want > 0)):
            return f"{name}: infinities differ"
        finite = want.isfinite()
        err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
        if err > 1e-5 * max(1.0, want[finite].abs().max().item()):
            return f"{name}: max error {err:.2e}"
    outside = torch.ones(s, dtype=torch.bool)
    outside[rows] = False
    if not (torch.equal(acc_out[:, :, outside], untouched[0][:, :, outside])
            and torch.equal(acc_lse[:, :, outside], untouched[1][:, :, outside])):
        return "rows outside the slice changed"
    return None


def main() -> int:
    checked, failures = 0, []
    grid = itertools.product((torch.float32, torch.bfloat16, torch.float16), (8, 40, 128, 256),
                             (slice(0, 29), slice(0, 14), slice(14, 29), slice(5, 6)))
    for i, (dtype, dim, rows) in enumerate(grid):
        problem = case(dtype, dim, rows, seed=i)
        checked += 1
        if problem:
            failures.append(f"{dtype} D={dim} rows={rows}: {problem}")
    print("\n".join(failures))
    print(f"checked {checked} cases, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
