"""Where a ring split loses against one whole call: the block kernels themselves, or the passes the ring adds.

    python benchmarks/ring_split_accounting.py --providers flash _native_cudnn --seqs 65536 --parts 4

Two measurements per case (zigzag causal, B=1, H=16, D=128, bf16, forward+backward):

1. Accounting (`--repeats` runs of each, in turns): the whole call and the split (benchmarks/run.py
   `ring_split_case`: all P ranks' block kernels, merges and gradient sums on this GPU, no communication) run
   under torch.profiler with CUDA activity only. Each kernel goes into a category by name (`category`):
   attention forward, attention backward, the provider's other kernels (a backward's preprocess and dQ
   conversion), the ring's merge, the ring's gradient sums, copies and elementwise kernels. Per category the
   median GPU time over the runs; the difference split - whole per category says what the gap is made of.

2. Block shapes (`--no-blocks` skips it): each distinct (query rows x keys, causal) block a zigzag ring computes
   (`block_shapes`: for P=4, one diagonal causal block per rank and half blocks of two shapes) and the whole
   call, forward then backward, each timed alone with do_bench in alternating rounds. The sum of every rank's
   block times over the whole call's time is the efficiency these kernels allow before any merge or sum:
   `kernel_bound`. What the ring adds beyond that is its own cost.

Nothing is asserted; the JSON under benchmarks/results/ (or --out) records the medians.

What it showed on an H100 (S=64k, P=4, results/h100/ring_split_accounting_h100.json)
    - Timed alone, every rank's blocks added up to 1.008 of the whole call's time with FA4 (forward+backward;
      0.989 forward) and 0.977 with cuDNN (0.971 forward). That overstates them: run back to back in the ring's
      order, the same kernels took 0.961-0.970 of the whole call with FA4 (benchmarks/split_sustained_probe.py,
      `blocks_in_sequence`), so `kernel_bound` is an upper bound. Called back to back instead (`--back-to-back`,
      ring_split_blocks_back_to_back_h100.json), each shape for about 1.5 s, the blocks allowed 0.970 (FA4)
      and 0.980 (cuDNN), where do_bench in the same run gave 1.006 and 0.997: under do_bench each block came out
      1.5-5.1% faster than back to back, the whole call 0.4-0.7%.
    - The passes the ring adds: merges 0.39 ms and gradient sums 0.77 ms (FA4), 1.14 ms (cuDNN), about 1.2% of
      a 97 ms call; cuDNN's per-block dQ conversion and dO . out add 2.4 ms more.
    - Under the profiler the split's span came within 0.997 (FA4) of the whole call's, but that is not the
      calls' speed: timed with CUDA events, one call at a time after the GPU rested, the split took 0.968 of the
      whole call (benchmarks/split_sustained_probe.py). Per-kernel times from two streams also overlap, so the
      category differences of the backward are upper bounds. Efficiency comes from benchmarks/run.py's timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import Counter

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cpattn  # noqa: E402
from benchmarks.run import RESULTS, bench_alternating, flops, ring_split_case, write_cases  # noqa: E402
from cpattn.cp.comm import CommStats  # noqa: E402
from cpattn.cp.mesh import Group  # noqa: E402
from cpattn.cp.ring import RingSpec, block_plan  # noqa: E402
from cpattn.dispatch import make_call  # noqa: E402

CATEGORIES = ("attention forward", "attention backward", "provider other", "merge", "gradient sums",
              "copies and elementwise", "other")


def category(kernel: str) -> str:
    """The category of a CUDA kernel (or memcpy/memset) by its name: FA4's kernels name their class
    (FlashAttentionForwardSm90, ...Backward..., ...BackwardPreprocess/Postprocess), cuDNN's say fprop/bprop
    (and compute_dot_do_o / convert_dq around a backward), cpattn's Triton kernels their function."""
    name = kernel.lower()
    if "_merge_" in name:
        return "merge"
    if "_add_parts" in name or "_add_rows" in name:
        return "gradient sums"
    if "preprocess" in name or "postprocess" in name or "compute_dot_do" in name or "convert_dq" in name:
        return "provider other"
    if "backward" in name or "bprop" in name or "flash_bwd" in name:
        return "attention backward"
    if "forward" in name or "fprop" in name or "flash_fwd" in name:
        return "attention forward"
    if "memcpy" in name or "memset" in name or "elementwise" in name or "copy" in name:
        return "copies and elementwise"
    return "other"


def block_shapes(s: int, p: int, layout: str = "zigzag", causal: bool = True) -> Counter:
    """(query rows, keys, causal) -> how many blocks of that shape all P ranks of a ring compute over S."""
    shapes = Counter()
    for me in range(p):
        spec = RingSpec(Group(None, me, p, "loopback"), layout, s, None, CommStats())
        for src in range(p):
            plan = block_plan(spec, me, src, causal)
            if plan is not None:
                shapes[(plan.rows.stop - plan.rows.start, plan.cols.stop - plan.cols.start, plan.causal)] += 1
    return shapes


def block_call(rows: int, keys: int, causal: bool, h: int = 16, d: int = 128, device="cuda",
               dtype=torch.bfloat16):
    """(call, dout) on random tensors of one block shape: `rows` queries against `keys` keys, B=1."""
    q = torch.randn(1, h, rows, d, device=device, dtype=dtype)
    k, v = (torch.randn(1, h, keys, d, device=device, dtype=dtype) for _ in range(2))
    return make_call(q, k, v, None, 0.0, causal, None, False), torch.randn_like(q)


def block_runner(adapter, call, dout, backward: bool):
    """The provider's forward of `call`, then its backward with that (out, lse) when `backward`."""
    def run():
        o, lse = adapter.forward(call)
        if backward:
            adapter.backward(call, dout, o, lse)
    return run


def _profiled(fn) -> dict:
    """GPU time per category of one call of `fn`, and the span from its first kernel's start to its last's end."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals = dict.fromkeys(CATEGORIES, 0.0)
    starts, ends = [], []
    for e in prof.events():
        if e.device_type.name == "CUDA":
            totals[category(e.name)] += (e.time_range.end - e.time_range.start) / 1e3
            starts.append(e.time_range.start)
            ends.append(e.time_range.end)
    totals["span"] = (max(ends) - min(starts)) / 1e3 if starts else 0.0
    return totals


def accounting(provider: str, s: int, p: int, repeats: int) -> dict:
    whole, split = ring_split_case(provider, s, p, backward=True)
    for fn in (whole, split, whole, split):  # compile, allocate, settle clocks
        fn()
    runs = {"whole": [], "split": []}
    for i in range(repeats):
        for name in (("whole", "split") if i % 2 == 0 else ("split", "whole")):
            runs[name].append(_profiled(whole if name == "whole" else split))
    row = {}
    for name, results in runs.items():
        row[name] = {key: statistics.median(r[key] for r in results) for key in results[0]}
        row[name]["kernel_ms"] = sum(row[name][c] for c in CATEGORIES)
    row["split_minus_whole_ms"] = {c: row["split"][c] - row["whole"][c] for c in (*CATEGORIES, "kernel_ms", "span")}
    row["efficiency_by_span"] = row["whole"]["span"] / row["split"]["span"]
    attention = ("attention forward", "attention backward", "provider other")
    row["efficiency_attention_kernels_only"] = (sum(row["whole"][c] for c in attention)
                                                / sum(row["split"][c] for c in attention))
    return row


def block_times(provider: str, s: int, p: int, rounds: int, h: int = 16, d: int = 128) -> dict:
    """do_bench of forward+backward (and forward alone) of each block shape and the whole call; kernel_bound:
    whole / (sum over all ranks' blocks)."""
    adapter = cpattn.PROVIDERS[provider]
    shapes = block_shapes(s, p)
    cases = {(s, s, True): 0, **shapes}

    def runner(rows, keys, causal, backward):
        return block_runner(adapter, *block_call(rows, keys, causal, h, d), backward)
    out = {"shapes": [{"rows": r, "keys": k, "causal": c, "count": n} for (r, k, c), n in shapes.items()]}
    for backward in (False, True):
        fns = {f"{r}x{k}{' causal' if c else ''}": runner(r, k, c, backward) for (r, k, c) in cases}
        times = bench_alternating(fns, rounds=rounds)
        label = "forward+backward" if backward else "forward"
        rows = []
        for (r, k, c), n in cases.items():
            ms = times[f"{r}x{k}{' causal' if c else ''}"]["median_ms"]
            work = flops(1, h, 1, d, False, backward) * r * k * (0.5 if c and r == k else 1.0)
            rows.append({"rows": r, "keys": k, "causal": c, "count": n, "median_ms": ms,
                         "tflops": work / ms / 1e9})
        whole_ms = rows[0]["median_ms"]
        blocks_ms = sum(x["median_ms"] * x["count"] for x in rows[1:])
        out[label] = {"blocks": rows, "whole_ms": whole_ms, "sum_of_blocks_ms": blocks_ms,
                      "kernel_bound": whole_ms / blocks_ms}
        torch.cuda.empty_cache()
    return out


def back_to_back_ms(fn, seconds: float = 1.5) -> float:
    """ms per call of `fn` called back to back for about `seconds` (no L2 flush, no gap): the GPU at the clock
    that sustained work gets, as in a ring's sequence of blocks or one long call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    calls = max(3, int(seconds * 1e3 / max(start.elapsed_time(end), 1e-3)))
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def block_times_back_to_back(provider: str, s: int, p: int, rounds: int, h: int = 16, d: int = 128) -> dict:
    """`block_times` for forward+backward with each shape called back to back (`back_to_back_ms`) instead of
    under do_bench, whose L2 flush between calls leaves the GPU a moment of lighter work before each one."""
    adapter = cpattn.PROVIDERS[provider]
    shapes = block_shapes(s, p)
    cases = [(s, s, True), *shapes]
    fns = {case: block_runner(adapter, *block_call(*case, h, d), backward=True) for case in cases}
    times = {case: [] for case in cases}
    for i in range(rounds):
        for case in (cases if i % 2 == 0 else cases[::-1]):
            times[case].append(back_to_back_ms(fns[case]))
    median = {case: statistics.median(t) for case, t in times.items()}
    whole_ms = median[cases[0]]
    blocks_ms = sum(median[case] * n for case, n in shapes.items())
    return {"blocks": [{"rows": r, "keys": k, "causal": c, "count": shapes.get((r, k, c), 0),
                        "median_ms": median[(r, k, c)], "round_ms": times[(r, k, c)]} for r, k, c in cases],
            "whole_ms": whole_ms, "sum_of_blocks_ms": blocks_ms, "kernel_bound": whole_ms / blocks_ms}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", nargs="*", default=["flash", "_native_cudnn"])
    parser.add_argument("--seqs", type=int, nargs="*", default=[65536])
    parser.add_argument("--parts", type=int, nargs="*", default=[4])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of the block-shape timing")
    parser.add_argument("--no-blocks", action="store_true")
    parser.add_argument("--no-accounting", action="store_true")
    parser.add_argument("--back-to-back", action="store_true",
                        help="also time each block shape forward+backward called back to back, without do_bench's flush")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default="ring_split_accounting")
    args = parser.parse_args(argv)
    rows = []
    for provider in args.providers:
        for s in args.seqs:
            for p in args.parts:
                row = {"provider": provider, "S": s, "P": p, "layout": "zigzag", "causal": True, "H": 16, "D": 128}
                try:
                    if not args.no_accounting:
                        row["accounting"] = accounting(provider, s, p, args.repeats)
                    if not args.no_blocks:
                        row["block_times"] = block_times(provider, s, p, args.rounds)
                    if args.back_to_back:
                        row["block_times_back_to_back"] = block_times_back_to_back(provider, s, p, args.rounds)
                except Exception as exc:  # record, keep going
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                rows.append(row)
                print(summary_line(row), flush=True)
                torch.cuda.empty_cache()
    print(f"wrote {write_cases(args.out, args.tag, rows)}")


def summary_line(row: dict) -> str:
    head = f"{row['provider']} S={row['S']} P={row['P']}"
    if "error" in row:
        return f"{head}: {row['error']}"
    line = f"{head}:"
    if "accounting" in row:
        acc = row["accounting"]
        gap = ", ".join(f"{c} {ms:+.2f}" for c, ms in acc["split_minus_whole_ms"].items() if abs(ms) >= 0.005)
        line += (f" span whole {acc['whole']['span']:.2f} split {acc['split']['span']:.2f} ms "
                 f"(efficiency {acc['efficiency_by_span']:.3f}; attention kernels only "
                 f"{acc['efficiency_attention_kernels_only']:.3f}); split - whole ms: {gap}")
    if "block_times" in row:
        bt = row["block_times"]
        line += (f"; kernel bound forward {bt['forward']['kernel_bound']:.3f}, "
                 f"forward+backward {bt['forward+backward']['kernel_bound']:.3f}")
    if "block_times_back_to_back" in row:
        line += f"; back to back, forward+backward {row['block_times_back_to_back']['kernel_bound']:.3f}"
    return line


if __name__ == "__main__":
    main()
