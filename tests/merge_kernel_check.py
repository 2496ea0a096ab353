"""Run by tests/test_merge_kernel.py in a process with TRITON_INTERPRET=1: the Triton merge kernel on CPU
tensors (Triton's interpreter) against `merge_two`, over dtypes, head dims, row slices and poisoned rows."""

from __future__ import annotations

import itertools
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cpattn.merge  # noqa: E402
from cpattn.cp.comm import CommStats  # noqa: E402
from cpattn.cp.layout import ring_positions  # noqa: E402
from cpattn.cp.mesh import Group  # noqa: E402
from cpattn.cp.ring import RingSpec, ring_forward  # noqa: E402
from cpattn.dispatch import make_call  # noqa: E402
from cpattn.merge import merge_two  # noqa: E402
from cpattn.merge_kernel import merge_into  # noqa: E402
from cpattn.providers import get_provider  # noqa: E402
from cpattn.reference import reference_attention  # noqa: E402


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


class _Loopback:
    """One rank's ring with no network: each exchange 'receives' the block rank r-1 would send."""

    def __init__(self, blocks, rank):
        self._blocks, self._rank, self._step = blocks, rank, 0

    def __call__(self, group, timeout, stats):
        return self

    def exchange(self, send, recv, kind):
        self._step += 1
        got = [t.clone() for t in self._blocks[(self._rank - self._step) % len(self._blocks)]]
        return type("Done", (), {"wait": staticmethod(lambda: got)})()


def ring_case(world: int, total: int, layout: str, causal: bool, hq: int, hkv: int) -> str | None:
    """Every rank's ring forward, its merges done by the kernel, against the float64 reference."""
    g = torch.Generator().manual_seed(world * 100 + total)
    q = torch.randn(2, hq, total, 16, generator=g)
    k, v = (torch.randn(2, hkv, total, 16, generator=g) for _ in range(2))
    want, _ = reference_attention(q.double(), k.double(), v.double(), is_causal=causal)
    pos = [ring_positions(total, world, r, layout) for r in range(world)]
    blocks = [(k[:, :, p].contiguous(), v[:, :, p].contiguous()) for p in pos]
    provider = get_provider("_native_math")
    for r in range(world):
        spec = RingSpec(Group(None, r, world, "loopback"), layout, total, 60.0, CommStats(),
                        channel_factory=_Loopback(blocks, r))
        call = make_call(q[:, :, pos[r]], *blocks[r], None, 0.0, causal, None, hq != hkv)
        out, _ = ring_forward(provider, call, spec)
        err = (out.double() - want[:, :, pos[r]]).abs().max().item()
        if err > 1e-5:
            return f"rank {r}: max error {err:.2e}"
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
    # The kernel inside the ring: zigzag steps merge into row slices of the accumulator.
    launches = []

    def counted(*args):
        launches.append(1)
        merge_into(*args)

    cpattn.merge._fuse_on = lambda acc_out: True
    cpattn.merge._fused_merge = lambda: counted
    for world, total, layout, causal, hq, hkv in ((3, 23, "zigzag", True, 4, 2), (4, 16, "zigzag", True, 16, 16),
                                                  (3, 20, "contiguous", False, 4, 4), (2, 9, "zigzag", False, 6, 3)):
        problem = ring_case(world, total, layout, causal, hq, hkv)
        checked += 1
        if problem:
            failures.append(f"ring W={world} S={total} {layout} causal={causal} Hq={hq} Hkv={hkv}: {problem}")
    if not launches:
        failures.append("the ring never called the fused merge")
    print("\n".join(failures))
    print(f"checked {checked} cases ({len(launches)} kernel merges in rings), {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
