"""Ring split on one device: a ring's work without its network, against one call on the whole sequence.

    python benchmarks/ring_split.py                               # FA4 and cuDNN, S 16k/64k/128k, P 2/4/8
    python benchmarks/ring_split.py --seqs 65536 --parts 4 --timing interleaved --masks causal noncausal
    python benchmarks/ring_split.py --seqs 65536 --parts 4 --accounting --block-shapes --back-to-back
    python benchmarks/ring_split.py --seqs 65536 --parts 4 --sustained --profile
    python benchmarks/ring_split.py --smoke                       # CPU or GPU, tiny shapes: does it run

`split`: all P ranks' block kernels, merges and gradient sums, one rank after another on this device, each rank
receiving the others' K/V blocks from a loopback channel (zigzag layout, B=1, H=16, D=128; bf16 on CUDA, float32
on CPU). `whole`: the provider's kernel on the whole sequence. Efficiency = whole time / split time: what a ring
of P devices can reach before any communication. The two take turns (`--timing`: do_bench runs in balanced
rounds, or call by call); --step-streams sets the streams of the split's backward (cpattn's option
cp_ring_streams). `max_diff_vs_whole`: the split's output (forward) or dQ (forward+backward) against
the whole call's, so a case that times wrong work shows.

Options, each adding to every case's row:
  --block-shapes  each distinct block shape (query rows x keys, causal) the ring computes, and the whole call,
                  timed alone, forward and forward+backward; `kernel_bound` = whole / sum over all ranks' blocks,
                  the efficiency these kernels allow before any merge or sum.
  --back-to-back  (CUDA) the same for forward+backward, each shape called back to back for about 1.5 s without
                  do_bench's L2 flush, the way a ring's sequence of blocks runs.
  --accounting    (CUDA) the whole call and the split under torch.profiler: GPU time per kernel category
                  (attention forward / backward, the provider's other kernels, merge, gradient sums, copies and
                  elementwise, other) and `split_minus_whole_ms`: what the gap is made of.
  --sustained     (CUDA) whole, split, split with the backward's steps on one stream and the ring's block kernels
                  in the ring's order without the ring, timed queued (do_bench), synced (one call at a time) and
                  isolated (after --rest seconds idle), with the SM clock and power (nvidia-smi) and the caching
                  allocator's counters: does the split lose in its kernels, the allocator or the clocks?
  --profile       (CUDA) one split under torch.profiler: host time to issue it, kernel time, the top kernels
                  and host ops, and the gaps in which the GPU waited.
Writes ring_split_<device>.json and a PNG beside it (efficiency against sequence length).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The named stand-in ring channel (no network) the ring tests use: one rank's ring steps run alone.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "support"))

from benchmarks import common  # noqa: E402
from loopback_ring import LoopbackRing  # noqa: E402

CUDA_ONLY = ("accounting", "sustained", "profile", "back_to_back")


class Case:
    """The shape and device of one measurement."""

    def __init__(self, provider: str, s: int, p: int, causal: bool, device: str, h: int, d: int):
        self.provider, self.s, self.p, self.causal, self.device, self.h, self.d = provider, s, p, causal, device, h, d
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def tensor(self, *shape):
        return torch.randn(*shape, device=self.device, dtype=self.dtype)


def ring_split_case(case: Case, backward: bool, step_streams=None):
    """(whole, split, shards): one kernel call on the whole sequence, and all P ranks' ring blocks and merges one
    after another with no communication (each rank 'receives' the blocks from a loopback). `whole` returns dQ
    (the output without `backward`); `split` each rank's, in zigzag order (only dQ is meaningful: a loopback
    brings no other rank's dK/dV parts); `shards` each rank's positions. `step_streams`: the backward's
    streams (RingSpec's default when None)."""
    import cpattn
    from cpattn.call import make_call
    from cpattn.cp.comm import CommStats
    from cpattn.cp.layout import ring_positions
    from cpattn.cp.mesh import Group
    from cpattn.cp.ring import RingSpec, ring_backward, ring_forward_keeping_last

    adapter = cpattn.PROVIDERS[case.provider]
    s, p = case.s, case.p
    q, k, v, dout = (case.tensor(1, case.h, s, case.d) for _ in range(4))
    full = make_call(q, k, v, None, 0.0, case.causal, None, False)
    out, lse = adapter.forward(full)

    def whole():
        o, l_ = adapter.forward(full)
        return adapter.backward(full, dout, o, l_)[0] if backward else o
    shards = [ring_positions(s, p, r, "zigzag", case.device) for r in range(p)]
    local = [(q.index_select(2, i), k.index_select(2, i), v.index_select(2, i), dout.index_select(2, i),
              out.index_select(2, i), lse.index_select(2, i)) for i in shards]
    blocks = [(lk.contiguous(), lv.contiguous()) for _, lk, lv, *_ in local]

    def split():
        results = []
        for r in range(p):
            spec = RingSpec(Group(None, r, p, "loopback"), "zigzag", s, 60.0, CommStats(),
                            channel_factory=LoopbackRing(blocks, r))
            if step_streams is not None:
                spec.step_streams = step_streams
            lq, lk, lv, ldo, lo, ll = local[r]
            call = make_call(lq, lk, lv, None, 0.0, case.causal, None, False)
            # dtypes as RingAttention asks for them, and its backward starts on the forward's last block
            o, _, last = ring_forward_keeping_last(adapter, call, spec, lq.dtype)
            results.append(ring_backward(adapter, call, spec, ldo, lo, ll, lq.dtype, last)[0] if backward else o)
        return results
    return whole, split, shards


def max_diff(whole, split, shards) -> float:
    """Largest difference of the split's per-rank results from the whole call's rows at those positions."""
    full = whole()
    return max((full.index_select(2, i).double() - part.double()).abs().max().item()
               for i, part in zip(shards, split()))


def timed_case(case: Case, backward: bool, timing: str, rounds: int, smoke: bool, step_streams=None) -> dict:
    whole, split, shards = ring_split_case(case, backward, step_streams)
    row = {"max_diff_vs_whole": max_diff(whole, split, shards), "timing": timing}
    # whole and split take turns: the same whole-sequence call timed once per case moved by as much as the gap
    # being measured
    if timing == "interleaved":
        times = common.bench_interleaved({"whole": whole, "split": split}, case.device,
                                         warmup_ms=10 if smoke else 100, budget_ms=300 if smoke else 6000,
                                         min_calls=12)
        row["efficiency_paired"] = common.paired_ratio(times["whole"].pop("call_ms"), times["split"].pop("call_ms"))
    else:
        times = common.bench_alternating({"whole": whole, "split": split}, case.device, rounds,
                                         cpu_seconds=0.02 if smoke else 0.2)
    row["whole"], row["split"] = times["whole"], times["split"]
    row["efficiency"] = row["whole"]["median_ms"] / row["split"]["median_ms"]
    row["round_efficiencies"] = [w / x for w, x in zip(times["whole"]["round_medians_ms"],
                                                       times["split"]["round_medians_ms"])]
    row["split_host_ms"] = common.host_ms(split, case.device)
    return row


# -- block shapes ----------------------------------------------------------------------------------------------


def block_shapes(s: int, p: int, layout: str = "zigzag", causal: bool = True) -> Counter:
    """(query rows, keys, causal) -> how many blocks of that shape all P ranks of a ring compute over S."""
    from cpattn.cp.comm import CommStats
    from cpattn.cp.mesh import Group
    from cpattn.cp.ring import RingSpec, block_plan

    shapes = Counter()
    for me in range(p):
        spec = RingSpec(Group(None, me, p, "loopback"), layout, s, None, CommStats())
        for src in range(p):
            plan = block_plan(spec, me, src, causal)
            if plan is not None:
                shapes[(plan.rows.stop - plan.rows.start, plan.cols.stop - plan.cols.start, plan.causal)] += 1
    return shapes


def block_call(case: Case, rows: int, keys: int, causal: bool):
    """(call, dout) on random tensors of one block shape: `rows` queries against `keys` keys, B=1."""
    from cpattn.call import make_call

    q = case.tensor(1, case.h, rows, case.d)
    k, v = (case.tensor(1, case.h, keys, case.d) for _ in range(2))
    return make_call(q, k, v, None, 0.0, causal, None, False), torch.randn_like(q)


def block_runner(adapter, call, dout, backward: bool):
    """The provider's forward of `call`, then its backward with that (out, lse) when `backward`."""
    def run():
        o, lse = adapter.forward(call)
        if backward:
            adapter.backward(call, dout, o, lse)
    return run


def block_times(case: Case, rounds: int, smoke: bool) -> dict:
    """Each block shape and the whole call timed alone in balanced rounds, forward and forward+backward;
    kernel_bound: whole / (sum over all ranks' blocks)."""
    import cpattn

    adapter = cpattn.PROVIDERS[case.provider]
    shapes = block_shapes(case.s, case.p, causal=case.causal)
    cases = {(case.s, case.s, case.causal): 0, **shapes}
    label = lambda r, k, c: f"{r}x{k}{' causal' if c else ''}"  # noqa: E731
    out = {"shapes": [{"rows": r, "keys": k, "causal": c, "count": n} for (r, k, c), n in shapes.items()]}
    for backward in (False, True):
        fns = {label(*shape): block_runner(adapter, *block_call(case, *shape), backward) for shape in cases}
        times = common.bench_alternating(fns, case.device, rounds, cpu_seconds=0.02 if smoke else 0.2)
        rows = []
        for (r, k, c), n in cases.items():
            ms = times[label(r, k, c)]["median_ms"]
            work = common.flops(1, case.h, 1, case.d, False, backward) * r * k * (0.5 if c and r == k else 1.0)
            rows.append({"rows": r, "keys": k, "causal": c, "count": n, "median_ms": ms, "tflops": work / ms / 1e9})
        whole_ms = rows[0]["median_ms"]
        blocks_ms = sum(x["median_ms"] * x["count"] for x in rows[1:])
        out["forward+backward" if backward else "forward"] = {
            "blocks": rows, "whole_ms": whole_ms, "sum_of_blocks_ms": blocks_ms, "kernel_bound": whole_ms / blocks_ms}
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


def block_times_back_to_back(case: Case, rounds: int) -> dict:
    """`block_times` for forward+backward with each shape called back to back (`back_to_back_ms`): under
    do_bench the L2 flush before each call gives the GPU a moment of lighter work."""
    import cpattn

    adapter = cpattn.PROVIDERS[case.provider]
    shapes = block_shapes(case.s, case.p, causal=case.causal)
    cases = [(case.s, case.s, case.causal), *shapes]
    fns = {shape: block_runner(adapter, *block_call(case, *shape), backward=True) for shape in cases}
    times = {shape: [] for shape in cases}
    for i in range(rounds):
        for shape in (cases if i % 2 == 0 else cases[::-1]):
            times[shape].append(back_to_back_ms(fns[shape]))
    median = {shape: statistics.median(t) for shape, t in times.items()}
    whole_ms = median[cases[0]]
    blocks_ms = sum(median[shape] * n for shape, n in shapes.items())
    return {"blocks": [{"rows": r, "keys": k, "causal": c, "count": shapes.get((r, k, c), 0),
                        "median_ms": median[(r, k, c)], "round_ms": times[(r, k, c)]} for r, k, c in cases],
            "whole_ms": whole_ms, "sum_of_blocks_ms": blocks_ms, "kernel_bound": whole_ms / blocks_ms}


# -- accounting: GPU time per kernel category ------------------------------------------------------------------

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


def accounting(case: Case, repeats: int) -> dict:
    """Per category the median GPU time over `repeats` profiled calls of each, whole and split in turns. Kernels
    of two streams overlap, so the backward's category differences are upper bounds."""
    whole, split, _ = ring_split_case(case, backward=True)
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


# -- sustained: queued, synced and isolated calls, with clocks, power and the allocator ------------------------

COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams", "num_ooms")


class Sampler:
    """nvidia-smi sampling the SM clock (MHz) and power (W) every `period_ms` into memory, with host timestamps."""

    def __init__(self, period_ms: int = 50) -> None:
        self._proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
             f"-lms={period_ms}"], stdout=subprocess.PIPE, text=True, bufsize=1)
        self.samples: list[tuple[float, float, float]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                clock, power = (float(x) for x in line.strip().split(","))
            except ValueError:
                continue
            self.samples.append((time.time(), clock, power))

    def window(self, start: float, end: float) -> dict:
        inside = [(c, p) for t, c, p in self.samples if start <= t <= end]
        if not inside:
            return {"samples": 0}
        return {"samples": len(inside), "sm_clock_mhz": statistics.mean(c for c, _ in inside),
                "power_w": statistics.mean(p for _, p in inside)}

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.wait()


def _counters() -> dict:
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in COUNTERS}


def _sustained_measure(mode: str, fn, sampler: Sampler, calls: int, rest_s: float) -> dict:
    torch.cuda.synchronize()
    before, t0 = _counters(), time.time()
    if mode == "queued":
        ms = common.bench_gpu(fn)["median_ms"]
    else:
        times = []
        for _ in range(calls):
            if mode == "isolated":
                time.sleep(rest_s)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        ms = statistics.median(times)
    torch.cuda.synchronize()
    t1, after = time.time(), _counters()
    # the isolated mode's windows are mostly rest: its clock and power describe the idle GPU as much as the calls
    return {"median_ms": ms, **sampler.window(t0, t1), "allocator": {k: after[k] - before[k] for k in COUNTERS}}


def blocks_in_sequence(case: Case):
    """The ring's block kernels without the ring: rank by rank, each block's forward in the ring's order, then
    each block's backward (the provider's own, one call each) in reverse; no merges, sums or shared dQ
    accumulator, one stream. Tensors per block shape are random and shared by the ranks."""
    import cpattn
    from cpattn.cp.comm import CommStats
    from cpattn.cp.mesh import Group
    from cpattn.cp.ring import RingSpec, block_plan

    adapter = cpattn.PROVIDERS[case.provider]
    calls = {}
    ranks = []
    for me in range(case.p):
        spec = RingSpec(Group(None, me, case.p, "loopback"), "zigzag", case.s, None, CommStats())
        plans = [block_plan(spec, me, (me - step) % case.p, case.causal) for step in range(case.p)]
        shapes = [(x.rows.stop - x.rows.start, x.cols.stop - x.cols.start, x.causal) for x in plans if x is not None]
        ranks.append([calls.setdefault(shape, block_call(case, *shape)) for shape in shapes])

    def run():
        for blocks in ranks:
            results = [adapter.forward(call) for call, _ in blocks]
            for (call, dout), (o, lse) in zip(reversed(blocks), reversed(results)):
                adapter.backward(call, dout, o, lse)
    return run


def sustained(case: Case, sampler: Sampler, rounds: int, calls: int, rest_s: float) -> dict:
    whole, split, _ = ring_split_case(case, backward=True)
    # the backward's steps on one stream: no part of a sum is made on another stream than the one adding it up,
    # so the allocator defers no free
    _, split_one_stream, _ = ring_split_case(case, backward=True, step_streams=1)
    fns = {"whole": whole, "split": split, "split_one_stream": split_one_stream,
           "blocks_in_sequence": blocks_in_sequence(case)}
    for fn in (*fns.values(), *fns.values()):
        fn()
    row = {}
    for mode in ("queued", "synced", "isolated"):
        runs = {name: [] for name in fns}
        for i in range(rounds):
            for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
                runs[name].append(_sustained_measure(mode, fns[name], sampler, calls, rest_s))
        summary = {name: {"median_ms": statistics.median(r["median_ms"] for r in results),
                          "round_ms": [r["median_ms"] for r in results],
                          "sm_clock_mhz": [r.get("sm_clock_mhz") for r in results],
                          "power_w": [r.get("power_w") for r in results],
                          "allocator": [r["allocator"] for r in results]} for name, results in runs.items()}
        for name in fns:
            if name != "whole":
                summary[f"efficiency_{name}"] = summary["whole"]["median_ms"] / summary[name]["median_ms"]
        row[mode] = summary
    return row


# -- profile: where one split's time goes ----------------------------------------------------------------------


def profile_split(case: Case, backward: bool, top: int = 15) -> dict:
    whole, split, _ = ring_split_case(case, backward)
    prof = common.profile_call(split)
    events = prof.key_averages()
    cpu = [e for e in events if e.device_type.name == "CPU"]
    kernels = common.kernel_summary(events, top)
    row = {"split_host_ms": common.host_ms(split, case.device), "kernel_ms": kernels["kernel_ms"],
           "kernel_launches": sum(e.count for e in events if e.device_type.name == "CUDA"),
           "top_kernels": kernels["top_kernels"],
           "top_host_ops": [{"name": e.key[:90], "count": e.count, "self_ms": e.self_cpu_time_total / 1e3}
                            for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:top]]}
    row.update(common.gpu_idle(prof, top))
    whole_prof = common.profile_call(whole, cpu=False, warm=False)
    row["whole_kernel_ms"] = common.kernel_summary(whole_prof.key_averages(), 0)["kernel_ms"]
    row["whole_gpu_span_ms"] = common.gpu_idle(whole_prof, 0).get("gpu_span_ms")
    return row


# -- driver ----------------------------------------------------------------------------------------------------


def run_case(case: Case, backward: bool, args, sampler) -> dict:
    row = {"provider": case.provider, "S": case.s, "P": case.p, "causal": case.causal, "backward": backward,
           "H": case.h, "D": case.d, "layout": "zigzag", "step_streams": args.step_streams or "default"}
    try:
        row.update(timed_case(case, backward, args.timing, args.rounds, args.smoke, args.step_streams))
        if args.profile:
            row["profile"] = profile_split(case, backward)
        if backward:  # the per-case extras measure forward and forward+backward at once
            if args.block_shapes:
                row["block_times"] = block_times(case, args.rounds, args.smoke)
            if args.back_to_back:
                row["block_times_back_to_back"] = block_times_back_to_back(case, args.rounds)
            if args.accounting:
                row["accounting"] = accounting(case, args.repeats)
            if args.sustained:
                row["sustained"] = sustained(case, sampler, args.rounds, args.calls, args.rest)
    except Exception as exc:  # record, keep going
        row["error"] = common.error_text(exc)
    if case.device == "cuda":
        torch.cuda.empty_cache()
    return row


def summary_line(row: dict) -> str:
    head = f"{row['provider']} S={row['S']} P={row['P']} causal={row['causal']} bwd={row['backward']}"
    if "error" in row:
        return f"{head}: {row['error']}"
    line = (f"{head}: whole {row['whole']['median_ms']:.3f} ms, split {row['split']['median_ms']:.3f} ms, "
            f"efficiency {row['efficiency']:.3f}")
    if "block_times" in row:
        bt = row["block_times"]
        line += (f"; kernel bound forward {bt['forward']['kernel_bound']:.3f}, "
                 f"forward+backward {bt['forward+backward']['kernel_bound']:.3f}")
    if "block_times_back_to_back" in row:
        line += f"; back to back {row['block_times_back_to_back']['kernel_bound']:.3f}"
    if "accounting" in row:
        gap = ", ".join(f"{c} {ms:+.2f}" for c, ms in row["accounting"]["split_minus_whole_ms"].items()
                        if abs(ms) >= 0.005)
        line += f"; split - whole ms: {gap}"
    if "sustained" in row:
        line += "; sustained efficiency " + ", ".join(
            f"{mode} {row['sustained'][mode]['efficiency_split']:.3f}" for mode in ("queued", "synced", "isolated"))
    return line


def plot(payload: dict, path: str) -> str | None:
    plt = common.pyplot()
    rows = [r for r in payload["cases"] if "efficiency" in r]
    if plt is None or not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, backward in zip(axes, (False, True)):
        keys = sorted({(r["provider"], r["P"], r["causal"]) for r in rows})
        for provider, p, causal in keys:
            sel = sorted((r for r in rows if (r["provider"], r["P"], r["causal"]) == (provider, p, causal)
                          and r["backward"] == backward), key=lambda r: r["S"])
            if sel:
                ax.plot([r["S"] for r in sel], [r["efficiency"] for r in sel], marker="o",
                        label=common.legend_label(f"{provider} P={p}{'' if causal else ' no mask'}"))
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title("forward+backward" if backward else "forward", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("whole call time / split time")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"ring split on one device: {payload['device']}")
    return common.save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when a GPU is present")
    parser.add_argument("--providers", nargs="*", help="default: cuda flash _native_cudnn; cpu _native_flash")
    parser.add_argument("--seqs", type=int, nargs="*", help="default: 16384 65536 131072 (smoke: 64)")
    parser.add_argument("--parts", type=int, nargs="*", help="ring sizes P (default 2 4 8; smoke: 2 4)")
    parser.add_argument("--masks", nargs="*", choices=("causal", "noncausal"), default=["causal"],
                        help="zigzag causal (the default), and/or no mask")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="balanced rounds per timing")
    parser.add_argument("--timing", choices=("rounds", "interleaved"), default="rounds",
                        help="do_bench runs in balanced rounds, or calls taking turns one by one")
    parser.add_argument("--step-streams", type=int, choices=(1, 2),
                        help="CUDA streams the split's backward steps take in turn (default: as cp_ring_streams)")
    parser.add_argument("--block-shapes", action="store_true", help="time each block shape alone")
    parser.add_argument("--back-to-back", action="store_true", help="(CUDA) block shapes called back to back")
    parser.add_argument("--accounting", action="store_true", help="(CUDA) GPU time per kernel category")
    parser.add_argument("--repeats", type=int, default=6, help="profiled calls per function of --accounting")
    parser.add_argument("--sustained", action="store_true",
                        help="(CUDA) queued, synced and isolated calls with clocks, power, allocator counters")
    parser.add_argument("--calls", type=int, default=12, help="calls per synced or isolated timing of --sustained")
    parser.add_argument("--rest", type=float, default=0.25, help="seconds idle before each isolated call")
    parser.add_argument("--profile", action="store_true", help="(CUDA) where one split's time goes")
    parser.add_argument("--smoke", action="store_true", help="S=64, H=2, D=16, 2 rounds, short timings")
    common.add_output_arguments(parser)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here")
    if device != "cuda" and any(getattr(args, name) for name in CUDA_ONLY):
        parser.error("--" + " --".join(n.replace("_", "-") for n in CUDA_ONLY) + " need a GPU")
    seqs, parts, h, d = args.seqs or [16384, 65536, 131072], args.parts or [2, 4, 8], args.heads, args.head_dim
    if args.smoke:
        seqs, parts, h, d, args.rounds = args.seqs or [64], args.parts or [2, 4], 2, 16, min(args.rounds, 2)
    providers = args.providers or (["flash", "_native_cudnn"] if device == "cuda" else ["_native_flash"])
    import cpattn

    providers = [p for p in providers if cpattn.PROVIDERS[p].availability().ok]
    label = common.device_name(device)
    payload = {"suite": "ring_split", "device": label, "environment": common.environment(), "timing": args.timing,
               "rounds": args.rounds, "cases": []}
    sampler = Sampler() if args.sustained else None
    combos = [(p, s, n, m, bw) for p in providers for m in args.masks for s in seqs for n in parts
              for bw in (False, True)]
    try:
        for provider, s, p, mask, backward in common.progress(combos, "ring split", not args.quiet):
            case = Case(provider, s, p, mask == "causal", device, h, d)
            payload["cases"].append(run_case(case, backward, args, sampler))
            print(summary_line(payload["cases"][-1]), flush=True)
    finally:
        if sampler is not None:
            sampler.stop()
    path = common.write_results(common.results_path("ring_split", label, args.out, args.tag), payload)
    png = None if args.no_plot else plot(payload, path)
    print(f"wrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
