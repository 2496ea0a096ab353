"""Run by tests/unit/test_merge_kernel.py in a process with TRITON_INTERPRET=1: the Triton merge kernel on CPU
tensors (Triton's interpreter) against `merge_two` for two blocks, over dtypes, head dims, row slices and poisoned
rows, in place and into new storage; for three and four blocks against a float64 merge; the merge into the first
block's own storage against the merge into new storage, bit for bit; then ring forwards whose merges it does. With --cuda (on a GPU): the kernel cases on CUDA tensors."""

from __future__ import annotations

import itertools
import os
import sys

import torch

CUDA = "--cuda" in sys.argv  # on a GPU: the kernel cases alone, on CUDA tensors, compiled (no interpreter)
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1, or with --cuda on a GPU"
DEVICE = "cuda" if CUDA else "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import cpattn.ops.merge  # noqa: E402
from cpattn.cp.comm import CommStats  # noqa: E402
from cpattn.cp.layout import ring_positions  # noqa: E402
from cpattn.cp.mesh import Group  # noqa: E402
from cpattn.cp.ring import RingSpec, ring_forward  # noqa: E402
from cpattn.call import make_call  # noqa: E402
from cpattn.ops.merge import merge_two  # noqa: E402
from cpattn.ops.merge_kernel import merge_blocks_into  # noqa: E402
from cpattn.providers import get_provider  # noqa: E402
from cpattn.reference import reference_attention  # noqa: E402
from loopback_ring import LoopbackRing  # noqa: E402


def _differs(got: torch.Tensor, want: torch.Tensor, name: str, tol: float) -> str | None:
    got, want = got.float(), want.float()
    if not torch.equal(got.isnan(), want.isnan()):
        return f"{name}: NaN in different places"
    if not torch.equal(got.isinf(), want.isinf()) or not torch.equal(got.isinf() & (got > 0), want.isinf() & (want > 0)):
        return f"{name}: infinities differ"
    finite = want.isfinite()
    err = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
    if err > tol * max(1.0, want[finite].abs().max().item()):
        return f"{name}: max error {err:.2e}"
    return None


def case(acc_dtype: torch.dtype, blk_dtype: torch.dtype, out_dtype: torch.dtype | None, dim: int, rows: slice,
         seed: int) -> str | None:
    """None if the kernel matches merge_two, else what differs. `out_dtype` None: in place on the block's rows
    of a float32 accumulator; else into new storage of that dtype over every row (acc in `acc_dtype`, a
    provider's first block kept as it came, here a transposed view)."""
    g = torch.Generator().manual_seed(seed)
    b, h, s = 2, 3, 29
    acc_out = torch.randn(b, s, h, dim, generator=g).to(device=DEVICE, dtype=acc_dtype).transpose(1, 2)  # (B, S, H, D)
    acc_lse = (torch.randn(b, h, s, generator=g) * 4).to(DEVICE)
    n = len(range(s)[rows])
    blk_out = torch.randn(b, h, n, dim, generator=g).to(device=DEVICE, dtype=blk_dtype)
    blk_lse = (torch.randn(b, h, n, generator=g) * 4).to(DEVICE)
    # Poisoned and empty rows: both empty, one empty, +inf, NaN, and a huge gap between the two lse.
    acc_lse[0, 0, rows][:2] = float("-inf")
    blk_lse[0, 0, :1] = float("-inf")
    blk_lse[0, 1, 1 % n] = float("nan")
    blk_lse[1, 0, 2 % n] = float("nan")
    acc_lse[1, 1, rows][3 % n] = float("inf")
    blk_lse[1, 2, 4 % n] = 500.0
    acc_out[1, 2, 0] = -0.0  # rows outside the block keep their bits
    want_out, want_lse = acc_out.float().clone(), acc_lse.clone()
    want_out[:, :, rows], want_lse[:, :, rows] = merge_two(acc_out[:, :, rows], acc_lse[:, :, rows], blk_out, blk_lse)
    before = (acc_out.clone(), acc_lse.clone())
    if out_dtype is None:
        acc_out = acc_out.float()
        view_out, view_lse = acc_out[:, :, rows], acc_lse[:, :, rows]
        merge_blocks_into(view_out, view_lse, [(view_out, view_lse, 0), (blk_out, blk_lse, 0)])
        got_out, got_lse = acc_out, acc_lse
        tol = 1e-5
    else:
        got_out = torch.empty(acc_out.shape, dtype=out_dtype, device=DEVICE)
        got_lse = torch.empty(acc_lse.shape, device=DEVICE)
        merge_blocks_into(got_out, got_lse, [(acc_out, acc_lse, 0), (blk_out, blk_lse, rows.start)])
        want_out = want_out.to(out_dtype)
        tol = 1e-5 if out_dtype == torch.float32 else 1e-2
        if not (torch.equal(acc_out, before[0]) and torch.equal(acc_lse, before[1])):
            return "the accumulator changed: a merge into new storage must leave it as it was"
    for got, want, name in ((got_out, want_out, "out"), (got_lse, want_lse, "lse")):
        problem = _differs(got, want, name, tol)
        if problem:
            return problem
    outside = torch.ones(s, dtype=torch.bool, device=DEVICE)
    outside[rows] = False
    # Outside the block: the accumulator's rows, bit for bit (converted to the result dtype as torch would).
    keep_out = before[0].float().to(got_out.dtype)[:, :, outside]
    if not (torch.equal(got_out[:, :, outside], keep_out)
            and torch.equal(got_out[:, :, outside].signbit(), keep_out.signbit())
            and torch.equal(got_lse[:, :, outside], before[1][:, :, outside])):
        return "rows outside the block changed"
    if out_dtype in (torch.bfloat16, torch.float16):  # rounded once, as torch casts the float32 result
        wide_out, wide_lse = torch.empty(acc_out.shape, device=DEVICE), torch.empty(acc_lse.shape, device=DEVICE)
        merge_blocks_into(wide_out, wide_lse, [(acc_out, acc_lse, 0), (blk_out, blk_lse, rows.start)])
        rounded = wide_out.to(out_dtype)
        same = (got_out == rounded) | (got_out.isnan() & rounded.isnan())
        if not bool(same.all()):
            return f"{out_dtype} rounding differs from torch's cast of the float32 result"
    return None


def _merge_float64(blocks, shape):
    """The guarded merge of merge_two over any number of blocks, each on its rows, in float64."""
    b, h, s, d = shape
    lses, outs = [], []
    for out_b, lse_b, first in blocks:
        lse = torch.full((b, h, s), float("-inf"), dtype=torch.float64, device=DEVICE)
        out = torch.zeros(shape, dtype=torch.float64, device=DEVICE)
        lse[:, :, first:first + out_b.shape[2]] = lse_b.double()
        out[:, :, first:first + out_b.shape[2]] = out_b.double()
        lses.append(lse)
        outs.append(out)
    lse = torch.stack(lses)
    m = lse.amax(dim=0)
    m = torch.where(torch.isneginf(m), 0.0, m)
    w = torch.exp(lse - m)
    z = w.sum(dim=0)
    total = torch.where(z == 0, float("-inf"), m + torch.log(z))
    w = w / z.clamp_min(torch.finfo(torch.float32).tiny)
    return sum(o * w[i].unsqueeze(-1) for i, o in enumerate(outs)), total


def many_case(n: int, out_dtype: torch.dtype, dim: int, spans: tuple, in_place: bool, seed: int,
              strided: bool = False) -> str | None:
    """None if the kernel's merge of `n` blocks (block i on rows spans[i]; some bf16 in a kernel's transposed
    layout) matches the float64 merge; blocks are never written unless `in_place` writes into the first.
    `strided`: the result goes into a (B, H, S, D) view of (B, S, H, D) storage (the packed ring's layout)."""
    g = torch.Generator().manual_seed(seed)
    b, h, s = 2, 3, 29
    blocks = []
    for i in range(n):
        rows = spans[i % len(spans)]
        k = len(range(s)[rows])
        dtype = torch.bfloat16 if i % 2 else torch.float32
        out_b = torch.randn(b, k, h, dim, generator=g).to(device=DEVICE, dtype=dtype).transpose(1, 2)
        lse_b = (torch.randn(b, h, k, generator=g) * 4).to(DEVICE)
        blocks.append((out_b, lse_b, rows.start))
    if in_place:  # the first block is float32 over every row and receives the merge
        first_out = torch.randn(b, h, s, dim, generator=g).to(DEVICE)
        blocks[0] = (first_out, (torch.randn(b, h, s, generator=g) * 4).to(DEVICE), 0)
    lse0 = blocks[0][1]
    lse0[0, 0, :2] = float("-inf")  # empty in the first block (and maybe in all)
    blocks[-1][1][0, 1, 0] = float("nan")
    blocks[1][1][1, 2, -1] = 500.0
    for _, lse_b, _ in blocks[1:]:
        lse_b[1, 0, :1] = float("-inf")
    blocks[0][1][1, 0, :1] = float("-inf")  # a row that is empty in every block covering it
    want_out, want_lse = _merge_float64(blocks, (b, h, s, dim))
    before = [(o.clone(), l.clone()) for o, l, _ in blocks]
    if in_place:
        got_out, got_lse = blocks[0][0], blocks[0][1]
    else:
        got_out = torch.empty(b, h, s, dim, dtype=out_dtype, device=DEVICE)
        if strided:
            got_out = torch.empty(b, s, h, dim, dtype=out_dtype, device=DEVICE).transpose(1, 2)
        got_lse = torch.empty(b, h, s, device=DEVICE)
    merge_blocks_into(got_out, got_lse, blocks)
    if not in_place and not all(torch.equal(o, bo) and torch.allclose(l, bl, rtol=0, atol=0, equal_nan=True)
                                for (o, l, _), (bo, bl) in zip(blocks, before)):
        return "a block changed"
    tol = 1e-5 if got_out.dtype == torch.float32 else 1e-2
    for got, want, name in ((got_out, want_out, "out"), (got_lse, want_lse, "lse")):
        problem = _differs(got, want, name, tol)
        if problem:
            return problem
    if got_out.dtype == torch.bfloat16:  # rounded once, as torch casts the float32 result
        wide_out, wide_lse = torch.empty(got_out.shape, device=DEVICE), torch.empty(got_lse.shape, device=DEVICE)
        merge_blocks_into(wide_out, wide_lse, blocks)
        same = (got_out == wide_out.bfloat16()) | (got_out.isnan() & wide_out.isnan())
        if not bool(same.all()):
            return "bf16 rounding differs from torch's cast of the float32 result"
    return None


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
                        channel_factory=LoopbackRing(blocks, r))
        call = make_call(q[:, :, pos[r]], *blocks[r], None, 0.0, causal, None, hq != hkv)
        out, _ = ring_forward(provider, call, spec)
        err = (out.double() - want[:, :, pos[r]]).abs().max().item()
        if err > 1e-5:
            return f"rank {r}: max error {err:.2e}"
    return None


def first_case(spans: tuple, dim: int, seed: int) -> str | None:
    """None if `PartialAttention.result_in_first` (the merge written into the first block, bf16 over every row in
    the packed ring's transposed layout) gives the bits `result(bf16)` gives, and leaves the rows outside the
    other blocks' span as they were."""
    g = torch.Generator().manual_seed(seed)
    b, h, s = 1, 3, 29

    def blocks():
        g.manual_seed(seed)
        first = torch.randn(b, s, h, dim, generator=g).to(device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
        first_lse = (torch.randn(b, h, s, generator=g) * 4).to(DEVICE)
        first_lse[0, 0, :3] = float("-inf")  # rows that see no key: out 0 there, as the contract has kernels give
        first[0, 0, :3] = 0.0
        first_lse[0, 2, 6] = float("-inf")  # one inside the others' rows, which a block covers
        first[0, 2, 6] = 0.0
        held = [(slice(0, s), first, first_lse)]
        for i, rows in enumerate(spans):
            k = rows.stop - rows.start
            dtype = torch.bfloat16 if i % 2 == 0 else torch.float32
            lse = (torch.randn(b, h, k, generator=g) * 4).to(DEVICE)
            lse[0, 1, :1] = float("-inf")
            held.append((rows, torch.randn(b, h, k, dim, generator=g).to(device=DEVICE, dtype=dtype), lse))
        return held

    def filled(held):
        acc = cpattn.ops.merge.PartialAttention(b, h, s, dim, DEVICE)
        for rows, o, l in held:
            acc.add_rows(rows, o, l)
        return acc

    fuse_on = cpattn.ops.merge._fuse_on
    cpattn.ops.merge._fuse_on = lambda acc_out: True  # the Triton merge on CPU tensors, under the interpreter
    try:
        want_out, want_lse = filled(blocks()).result(torch.bfloat16)
        held = blocks()
        before_out, before_lse = held[0][1].clone(), held[0][2].clone()
        merged = filled(held).result_in_first(torch.bfloat16)
    finally:
        cpattn.ops.merge._fuse_on = fuse_on
    if merged is None:
        return "result_in_first did not apply"
    got_out, got_lse = merged
    if got_out.data_ptr() != held[0][1].data_ptr():
        return "not written into the first block"
    same = lambda x, y: bool(((x == y) | (x.isnan() & y.isnan())).all())  # noqa: E731
    if not (same(got_out, want_out) and same(got_lse, want_lse)):
        return "the merge in the first block differs from result(bf16)"
    lo, hi = min(r.start for r in spans), max(r.stop for r in spans)
    outside = [slice(0, lo), slice(hi, s)]
    if not all(torch.equal(got_out[:, :, r], before_out[:, :, r]) and torch.equal(got_lse[:, :, r], before_lse[:, :, r])
               for r in outside):
        return "rows outside the other blocks changed"
    return None


def main() -> int:
    checked, failures = 0, []
    # In place (float32 accumulator), and into new storage: from a float32 or a kept bf16 first block, to
    # float32 (the first merge) or the result dtype (the last).
    modes = ((torch.float32, None), (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16))
    grid = itertools.product(modes, (torch.float32, torch.bfloat16), (8, 40, 128),
                             (slice(0, 29), slice(0, 14), slice(14, 29), slice(5, 6)))
    for i, ((acc_dtype, out_dtype), blk_dtype, dim, rows) in enumerate(grid):
        problem = case(acc_dtype, blk_dtype, out_dtype, dim, rows, seed=i)
        checked += 1
        if problem:
            failures.append(f"acc {acc_dtype} block {blk_dtype} -> {out_dtype or 'in place'} D={dim} rows={rows}: "
                            f"{problem}")
    # Three and four blocks in one launch (the ring's merge at the end): full and zigzag late-half rows, rows
    # no block covers, new storage in float32 or bf16, or in place into a float32 first block.
    spans = ((slice(0, 29), slice(14, 29)), (slice(0, 29), slice(0, 29), slice(14, 29)), (slice(3, 20), slice(10, 29)))
    many = itertools.product((3, 4), ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True)),
                             (8, 128), spans)
    for i, (n, (out_dtype, in_place), dim, span) in enumerate(many):
        problem = many_case(n, out_dtype, dim, span, in_place, seed=1000 + i)
        checked += 1
        if problem:
            failures.append(f"{n} blocks -> {out_dtype}{' in place' if in_place else ''} D={dim} rows={span}: "
                            f"{problem}")
    for i, (n, dim) in enumerate(itertools.product((2, 3), (8, 128))):  # into a transposed view
        problem = many_case(n, torch.bfloat16, dim, spans[0], False, seed=1500 + i, strided=True)
        checked += 1
        if problem:
            failures.append(f"{n} blocks -> a transposed bf16 view D={dim}: {problem}")
    # Merged into the first block's own storage (the packed ring's diagonal chain): one and three other blocks,
    # overlapping or with a gap between them.
    for i, (span, dim) in enumerate(itertools.product(((slice(5, 12),), (slice(2, 9), slice(6, 14), slice(20, 27))),
                                                      (8, 128))):
        problem = first_case(span, dim, seed=1700 + i)
        checked += 1
        if problem:
            failures.append(f"into the first block, others on {span} D={dim}: {problem}")
    if CUDA:
        print("\n".join(failures))
        print(f"checked {checked} kernel cases on {torch.cuda.get_device_name()}, {len(failures)} failed")
        return 1 if failures else 0
    # The kernel inside the ring: zigzag steps merge into row slices of the accumulator.
    launches = []

    def counted(*args):
        launches.append(1)
        merge_blocks_into(*args)

    cpattn.ops.merge._fuse_on = lambda acc_out: True
    cpattn.ops.merge._fused_merge = lambda: counted
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
