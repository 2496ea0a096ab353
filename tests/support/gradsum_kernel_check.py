"""Run by tests/unit/test_gradsum_kernel.py in a process with TRITON_INTERPRET=1: the Triton gradient sum on CPU
tensors (Triton's interpreter) against torch ops, bit for bit, over dtypes, head dims, row ranges and strides,
for two parts (in place and into new storage) and through `DeferredRowSum` for 3 to 2*MAX_PARTS+1 (and, with
writable parts, made in the part over every row); then ring backwards at
2-4 gloo ranks with that kernel doing their sums, against float64. With --cuda on a GPU: the kernel cases, and
DeferredRowSum over parts made late on other CUDA streams, with a control that must fail without DeferredRowSum's waits."""

from __future__ import annotations

import itertools
import os
import sys

import torch

CUDA = "--cuda" in sys.argv  # on a GPU: the kernel cases alone, on CUDA tensors, compiled (no interpreter)
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1, or with --cuda on a GPU"
DEVICE = "cuda" if CUDA else "cpu"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

import cpattn.ops.gradsum as gradsum  # noqa: E402
from cp_harness import Case, run_cases  # noqa: E402
from cpattn.ops.gradsum_kernel import add_parts_into  # noqa: E402
from reliability_helpers import cp_tolerance  # noqa: E402


def _tensor(shape, dtype, g, transposed: bool) -> torch.Tensor:
    """Random values with some -0.0; `transposed`: a (B, H, S, D) view of (B, S, H, D) storage, as FA4 returns."""
    b, h, s, d = shape
    x = torch.randn(b, s, h, d, generator=g) if transposed else torch.randn(b, h, s, d, generator=g)
    x[x.abs() < 0.05] = -0.0
    x = x.to(dtype=dtype, device=DEVICE)
    return x.transpose(1, 2) if transposed else x


def case(total_dtype, part_dtype, out_dtype, dim, rows: slice, seed: int) -> str | None:
    """None if the kernel gives the bits the torch ops give, else what differs."""
    g = torch.Generator().manual_seed(seed)
    b, h, s = 2, 3, 29
    n = len(range(s)[rows])
    total = _tensor((b, h, s, dim), total_dtype, g, transposed=seed % 2 == 0)
    part = _tensor((b, h, n, dim), part_dtype, g, transposed=seed % 3 == 0)
    want = total.to(torch.float32, copy=True)
    want.narrow(2, rows.start, n).add_(part)
    want = want.to(out_dtype)
    before = total.clone()
    if total_dtype == out_dtype == torch.float32 and seed % 2:  # in place, on a view of the part's rows
        view = total.narrow(2, rows.start, n)
        add_parts_into(view, [(view, 0), (part, 0)])
        got = total
    elif total_dtype == out_dtype == torch.float32:  # in place on the whole sum: only the part's rows touched
        add_parts_into(total, [(total, 0), (part, rows.start)])
        got = total
    else:
        got = torch.empty(total.shape, dtype=out_dtype, device=DEVICE)
        add_parts_into(got, [(total, 0), (part, rows.start)])
        if not torch.equal(total, before):
            return "total changed"
    as_bits = {2: torch.int16, 4: torch.int32}[out_dtype.itemsize]
    if not torch.equal(got.view(as_bits), want.view(as_bits)):
        return f"bits differ: max error {(got.double() - want.double()).abs().max().item():.2e}"
    return None


def row_sum_case(n: int, out_dtype, dim, spans: tuple, seed: int) -> str | None:
    """None if `DeferredRowSum` over `n` parts (part i on rows spans[i % len]) gives, through the kernel, the bits of its
    torch path (first part as it is, float32 adds in order, one rounding), and leaves the parts as they were."""
    g = torch.Generator().manual_seed(seed)
    b, h, s = 2, 3, 29
    parts = [(spans[i % len(spans)], _tensor((b, h, len(range(s)[spans[i % len(spans)]]), dim),
                                               torch.bfloat16 if i % 3 else torch.float32, g, transposed=i % 2 == 0))
             for i in range(n)]
    before = [p.clone() for _, p in parts]
    sums = {}
    for fused in (True, False):
        gradsum._fuse_on = lambda part, fused=fused: fused
        total = gradsum.DeferredRowSum((b, h, s, dim), DEVICE)
        for rows, part in parts:
            total.add(rows, part)
        sums[fused] = total.result(out_dtype)
    gradsum._fuse_on = lambda part: part.is_cuda
    if not all(torch.equal(p, q) and torch.equal(p.signbit(), q.signbit()) for (_, p), q in zip(parts, before)):
        return "a part changed"
    got, want = sums[True], sums[False]
    if got.dtype != out_dtype:
        return f"result in {got.dtype}, not {out_dtype}"
    return _bits_problem(got, want) or _sum_problem(got, parts)


def _as_bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32}[x.dtype.itemsize])


def _bits_problem(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None if the kernel's sum `got` has the bits of the torch path's `want`."""
    if not torch.equal(_as_bits(got), _as_bits(want)):
        return f"bits differ: max error {(got.double() - want.double()).abs().max().item():.2e}"
    return None


def _sum_problem(got: torch.Tensor, parts: list) -> str | None:
    """None if `got` is within rounding of the float64 sum of `parts` ((rows, part) pairs)."""
    exact = torch.zeros(got.shape, dtype=torch.float64, device=DEVICE)
    for rows, part in parts:
        exact[:, :, rows] += part.double()
    err = (got.double() - exact).abs().max().item()
    if err > (1e-5 if got.dtype == torch.float32 else 2e-2) * max(1.0, exact.abs().max().item()):
        return f"max error {err:.2e} against the float64 sum"
    return None


def writable_case(n: int, out_dtype, dim, whole_at: int, seed: int) -> str | None:
    """None if `DeferredRowSum(writable_parts=True)` over `n` parts, part `whole_at` over every row in `out_dtype`
    and the others on some rows, makes the sum in that part (its storage, no other), through the kernel with the
    bits of its torch path, its rows no other part covers unchanged, within rounding of the float64 sum."""
    g = torch.Generator().manual_seed(seed)
    b, h, s = 2, 3, 29
    spans = (slice(14, 29), slice(3, 9), slice(20, 24))
    made = [(spans[i % 3], _tensor((b, h, len(range(s)[spans[i % 3]]), dim), torch.bfloat16, g, i % 2 == 0))
            for i in range(n - 1)]
    whole = _tensor((b, h, s, dim), out_dtype, g, transposed=seed % 2 == 0)
    made.insert(whole_at, (slice(0, s), whole))
    sums = {}
    for fused in (True, False):
        gradsum._fuse_on = lambda part, fused=fused: fused
        parts = [(rows, p.clone()) for rows, p in made]
        total = gradsum.DeferredRowSum((b, h, s, dim), DEVICE, writable_parts=True)
        for rows, part in parts:
            total.add(rows, part)
        sums[fused] = total.result(out_dtype)
        base = parts[whole_at][1]
        if sums[fused].data_ptr() != base.data_ptr() and base.is_contiguous():
            return f"fused={fused}: the sum was not made in the whole part"
    gradsum._fuse_on = lambda part: part.is_cuda
    got, want = sums[True], sums[False]
    problem = _bits_problem(got, want)
    if problem:
        return problem
    untouched = [r for r in range(s) if not any(r in range(s)[rows] for rows, _ in made if rows.stop - rows.start < s)]
    if not torch.equal(_as_bits(got[:, :, untouched].contiguous()), _as_bits(whole[:, :, untouched].contiguous())):
        return "rows no other part covers changed"
    return _sum_problem(got, made)


def cross_stream_case(n: int, out_dtype, seed: int, ordered: bool = True) -> str | None:
    """CUDA only: None if `DeferredRowSum` over `n` parts, each made on one of two side streams after ~10 ms of spinning
    there and added on that stream (as a ring backward's steps add theirs, cpattn/cp/streams.py), summed on the
    home stream with no other synchronisation, equals the float64 sum of the parts. `ordered=False` is the
    control: DeferredRowSum's waits for the parts' streams switched off, which must then read parts not yet written."""
    torch.manual_seed(seed)
    b, h, s, d = 2, 3, 29, 64
    home = torch.cuda.current_stream()
    sides = [torch.cuda.Stream(), torch.cuda.Stream()]
    values = [torch.randn(b, h, s, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(n)]
    read_here = gradsum.DeferredRowSum._read_here
    if not ordered:
        gradsum.DeferredRowSum._read_here = lambda self: None
    try:
        total = gradsum.DeferredRowSum((b, h, s, d), DEVICE)
        for i, value in enumerate(values):
            side = sides[i % 2]
            side.wait_stream(home)
            with torch.cuda.stream(side):
                torch.cuda._sleep(20_000_000)
                total.add(slice(0, s), value * 1)  # made on the side stream, after the spin
        got = total.result(out_dtype)
    finally:
        gradsum.DeferredRowSum._read_here = read_here
    torch.cuda.synchronize()
    exact = sum(v.double() for v in values)
    err = (got.double() - exact).abs().max().item()
    return None if err <= (1e-5 if out_dtype == torch.float32 else 2e-2) * exact.abs().max().item() else (
        f"max error {err:.2e} against the float64 sum")


def main() -> int:
    checked, failures = 0, []
    dtypes = ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float16, torch.float16),
              (torch.float32, torch.float32))
    grid = itertools.product(dtypes, (torch.float32, torch.bfloat16), (8, 24, 128),
                             (slice(0, 29), slice(0, 14), slice(14, 29), slice(5, 6)))
    for i, ((total_dtype, part_dtype), out_dtype, dim, rows) in enumerate(grid):
        problem = case(total_dtype, part_dtype, out_dtype, dim, rows, seed=i)
        checked += 1
        if problem:
            failures.append(f"total {total_dtype} part {part_dtype} out {out_dtype} D={dim} rows={rows}: {problem}")
    # DeferredRowSum (the ring's dQ): three parts to twice MAX_PARTS (folds in float32 between launches), zigzag halves,
    # rows no part covers, a first part over some rows only.
    spans = ((slice(0, 29), slice(14, 29)), (slice(0, 29), slice(0, 29), slice(14, 29)), (slice(3, 20), slice(10, 29)))
    for i, (n, out_dtype, dim, span) in enumerate(itertools.product(
            (3, gradsum.MAX_PARTS, 2 * gradsum.MAX_PARTS + 1), (torch.float32, torch.bfloat16), (8, 128), spans)):
        problem = row_sum_case(n, out_dtype, dim, span, seed=500 + i)
        checked += 1
        if problem:
            failures.append(f"DeferredRowSum of {n} parts -> {out_dtype} D={dim} rows={span}: {problem}")
    # DeferredRowSum(writable_parts=True), the packed ring's sums: made in the part over every row, 2 to MAX_PARTS
    for i, (n, out_dtype, dim) in enumerate(itertools.product(range(2, gradsum.MAX_PARTS + 1),
                                                              (torch.float32, torch.bfloat16), (8, 128))):
        whole_at = i % n
        problem = writable_case(n, out_dtype, dim, whole_at, seed=700 + i)
        checked += 1
        if problem:
            failures.append(f"writable DeferredRowSum of {n} parts (whole part {whole_at}) -> {out_dtype} D={dim}: "
                            f"{problem}")
    if CUDA:  # parts made on other streams (fold on a side stream from MAX_PARTS + 1 parts on)
        for i, (n, out_dtype) in enumerate(itertools.product((2, gradsum.MAX_PARTS + 1, 2 * gradsum.MAX_PARTS + 1),
                                                             (torch.float32, torch.bfloat16))):
            problem = cross_stream_case(n, out_dtype, seed=900 + i)
            checked += 1
            if problem:
                failures.append(f"DeferredRowSum of {n} parts from two side streams -> {out_dtype}: {problem}")
        checked += 1
        if cross_stream_case(2, torch.float32, seed=999, ordered=False) is None:
            failures.append("DeferredRowSum with its stream waits switched off summed the late parts right too: the "
                            "cross-stream cases above cannot tell")
        print("\n".join(failures))
        print(f"checked {checked} kernel cases on {torch.cuda.get_device_name()}, {len(failures)} failed")
        return 1 if failures else 0
    gradsum._fuse_on = lambda part: True
    # Ring backwards whose gradient adds (and merges) run in the kernels, at 2-4 ranks, against float64.
    os.environ["CPATTN_TEST_TRITON_ON_CPU"] = "1"
    adds = 0
    for world in (2, 3, 4):
        cases = [Case(strategy="ring", layout=layout, causal=causal, dtype="bfloat16", seq=seq, q_heads=4, kv_heads=2)
                 for layout, causal, seq in (("zigzag", True, 4 * world + 3), ("contiguous", False, 3 * world),
                                             ("contiguous", True, 2 * world + 1))]  # ranks that add nothing
        cases.append(Case(strategy="ring", dtype="bfloat16", q_heads=world * 2, kv_heads=world * 2, seq=world * 2,
                          head_dim=8))  # heads == seq_len
        outcomes = run_cases(world, cases, timeout=240)
        for c in cases:
            o = outcomes[c.name]
            checked += 1
            if o.exception:
                failures.append(f"ring W={world} {c.name}: {o.exception}")
                continue
            adds = max(adds, o.stats.get("fused_grad_adds", 0))
            bad = {k: v for k, v in o.errors.items()
                   if k in ("dq", "dk", "dv") and not v <= cp_tolerance(torch.bfloat16, world, "grad")}
            if bad or not o.errors.get("out", 1) <= cp_tolerance(torch.bfloat16, world):
                failures.append(f"ring W={world} {c.name}: errors {o.errors}")
    if not adds:
        failures.append("the ring backward never called the fused gradient add")
    print("\n".join(failures))
    print(f"checked {checked} cases ({adds} fused gradient adds on one rank), {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
