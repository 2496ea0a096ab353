"""The ring split against one whole call, timed three ways, with the GPU's clock and power and the allocator's
counters: does the split lose in its kernels, in the caching allocator, or in how hard it drives the GPU?

    python benchmarks/split_sustained_probe.py --providers flash _native_cudnn --seqs 65536 --parts 4

Why
    At S=64k, P=4 (zigzag causal, forward+backward, FA4) the split measured 0.968 of the whole call under
    do_bench, while the same two functions profiled one call at a time (benchmarks/ring_split_accounting.py)
    spanned 93.74 and 93.43 ms on the GPU (0.997), and every block shape timed alone under do_bench added up to
    less than the whole call. So the gap appears only when calls run back to back.

Functions: the whole call, the split, and the split with its backward's steps on one stream (then no gradient
part is freed across streams, so the caching allocator defers none: a host that runs ahead of the GPU could
otherwise make it hold or allocate more); `blocks_in_sequence`, the ring's block kernels in the ring's order
without the ring (no merges, sums or shared accumulator); and for FA4 the split with every block on its own
backward (`without_shared_accumulator`: the library's tile, dQ parts summed at the end). Modes (the functions take turns, `--rounds` times per mode):
    queued:   do_bench as the benchmark suite runs it (benchmarks/run.py bench_gpu): the host issues call after
              call without waiting, each after an L2 flush.
    synced:   `--calls` calls, each timed between CUDA events and followed by a synchronize: the host never runs
              ahead of the GPU.
    isolated: the same, with `--rest` seconds of idle GPU before each call (clocks and power recover).
For each mode and function: median ms per call, the SM clock and power draw sampled by nvidia-smi while it ran
(mean), and the changes in the caching allocator's counters (cudaMalloc/cudaFree calls, retries, syncs).

What it showed on an H100 (results/h100/split_sustained_probe_h100.json, two rounds per mode)
    - The gap is the same in every mode, so it is neither the host running ahead nor the allocator:
      FA4 0.964 queued, 0.964 synced, 0.968 isolated; cuDNN 0.965, 0.972, 0.977. No allocator retries, no
      cudaFree, no synchronisation of all streams in any mode (8 and 17 new cudaMallocs for the split, queued).
    - Back to back, every function ran at the power limit (675-699 W) and the SM clock fell to 1460-1550 MHz;
      isolated calls ran at about 1880 MHz. The split ran at the same or a higher clock than the whole call, so
      it does not lose by drawing more power.
    - The backward's steps on one stream were slower in every mode (FA4 0.957-0.962, cuDNN 0.952-0.963).
    - A second run with the block kernels alone (split_sustained_probe_blocks_h100.json, queued and isolated):
      `blocks_in_sequence` took 0.961 / 0.970 of the whole call with FA4 (the split 0.964 / 0.969) and 0.974 /
      0.977 with cuDNN (the split 0.969 / 0.979); FA4's split without the shared dQ accumulator 0.959 / 0.963.
      The ring's merges, sums and streams cost nothing net there; the blocks themselves set the limit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cpattn  # noqa: E402
from benchmarks.ring_split_accounting import block_call  # noqa: E402
from benchmarks.run import RESULTS, bench_gpu, ring_split_case, write_cases  # noqa: E402
from cpattn.cp.comm import CommStats  # noqa: E402
from cpattn.cp.mesh import Group  # noqa: E402
from cpattn.cp.ring import RingSpec, block_plan  # noqa: E402

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


def counters() -> dict:
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in COUNTERS}


def timed_calls(fn, calls: int, rest_s: float) -> list[float]:
    times = []
    for _ in range(calls):
        if rest_s:
            time.sleep(rest_s)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def measure(mode: str, fn, sampler: Sampler, calls: int, rest_s: float) -> dict:
    torch.cuda.synchronize()
    before, t0 = counters(), time.time()
    if mode == "queued":
        ms = bench_gpu(fn)["median_ms"]
    else:
        ms = statistics.median(timed_calls(fn, calls, rest_s if mode == "isolated" else 0.0))
    torch.cuda.synchronize()
    t1, after = time.time(), counters()
    # the isolated mode's windows are mostly rest: its clock and power describe the idle GPU as much as the calls
    return {"median_ms": ms, **sampler.window(t0, t1), "allocator": {k: after[k] - before[k] for k in COUNTERS},
            "reserved_gib": torch.cuda.memory_reserved() / 2**30}


def blocks_in_sequence(provider: str, s: int, p: int, h: int = 16, d: int = 128, device: str = "cuda",
                       dtype=torch.bfloat16):
    """The ring's block kernels without the ring: rank by rank, each block's forward in the ring's order, then
    each block's backward (the provider's own, one call each) in reverse; no merges, sums or shared dQ
    accumulator, one stream. Tensors per block shape (and mask) are random and shared by the ranks."""
    adapter = cpattn.PROVIDERS[provider]
    calls = {}

    def call_of(rows, keys, causal):
        if (rows, keys, causal) not in calls:
            calls[(rows, keys, causal)] = block_call(rows, keys, causal, h, d, device, dtype)
        return calls[(rows, keys, causal)]

    ranks = []
    for me in range(p):
        spec = RingSpec(Group(None, me, p, "loopback"), "zigzag", s, None, CommStats())
        plans = [block_plan(spec, me, (me - step) % p, True) for step in range(p)]
        ranks.append([call_of(x.rows.stop - x.rows.start, x.cols.stop - x.cols.start, x.causal)
                      for x in plans if x is not None])

    def run():
        for blocks in ranks:
            results = [adapter.forward(call) for call, _ in blocks]
            for (call, dout), (o, lse) in zip(reversed(blocks), reversed(results)):
                adapter.backward(call, dout, o, lse)
    return run


def without_shared_accumulator(fn):
    """`fn` with FA4's shared dQ accumulator off (cpattn/providers/fa4_rows.py): every block runs the provider's
    own backward on the library's tile, and its dQ is summed with the others at the end."""
    from cpattn.providers import fa4_rows

    def run():
        with mock.patch.object(fa4_rows, "shared_accumulator", lambda *args, **kwargs: None):
            fn()
    return run


def probe(provider: str, s: int, p: int, rounds: int, calls: int, rest_s: float, sampler: Sampler,
          modes=("queued", "synced", "isolated")) -> dict:
    whole, split = ring_split_case(provider, s, p, backward=True)
    # the backward's steps on one stream: no part of a sum is made on another stream than the one adding it up,
    # so the allocator defers no free (RowSum's record_stream)
    _, split_one_stream = ring_split_case(provider, s, p, backward=True, step_streams=1)
    fns = {"whole": whole, "split": split, "split_one_stream": split_one_stream,
           "blocks_in_sequence": blocks_in_sequence(provider, s, p)}
    if provider == "flash":
        fns["split_per_block_backward"] = without_shared_accumulator(split)
    for fn in (*fns.values(), *fns.values()):
        fn()
    row = {"provider": provider, "S": s, "P": p, "causal": True, "layout": "zigzag", "backward": True}
    for mode in modes:
        runs = {name: [] for name in fns}
        for i in range(rounds):
            order = list(fns) if i % 2 == 0 else list(fns)[::-1]
            for name in order:
                runs[name].append(measure(mode, fns[name], sampler, calls, rest_s))
        summary = {}
        for name, results in runs.items():
            summary[name] = {
                "median_ms": statistics.median(r["median_ms"] for r in results),
                "round_ms": [r["median_ms"] for r in results],
                "sm_clock_mhz": [r.get("sm_clock_mhz") for r in results],
                "power_w": [r.get("power_w") for r in results],
                "allocator": [r["allocator"] for r in results],
                "reserved_gib": results[-1]["reserved_gib"],
            }
        for name in fns:
            if name != "whole":
                summary[f"efficiency_{name}"] = summary["whole"]["median_ms"] / summary[name]["median_ms"]
        row[mode] = summary
        print(f"{provider} S={s} P={p} {mode}: " + ", ".join(f"{n} {summary[n]['median_ms']:.2f}" for n in fns)
              + " ms; efficiency " + ", ".join(f"{n} {summary['efficiency_' + n]:.3f}" for n in fns if n != "whole")
              + "; clock "
              + " / ".join(_mean(summary[n]['sm_clock_mhz']) for n in fns) + " MHz, power "
              + " / ".join(_mean(summary[n]['power_w']) for n in fns) + " W; allocator (last round) "
              + "; ".join(f"{n} {summary[n]['allocator'][-1]}" for n in fns), flush=True)
    return row


def _mean(values) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.0f}" if values else "-"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", nargs="*", default=["flash", "_native_cudnn"])
    parser.add_argument("--seqs", type=int, nargs="*", default=[65536])
    parser.add_argument("--parts", type=int, nargs="*", default=[4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", nargs="*", choices=("queued", "synced", "isolated"),
                        default=["queued", "synced", "isolated"])
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--rest", type=float, default=0.25, help="seconds of idle GPU before each isolated call")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default="split_sustained_probe")
    args = parser.parse_args(argv)
    sampler = Sampler()
    rows = []
    try:
        for provider in args.providers:
            for s in args.seqs:
                for p in args.parts:
                    try:
                        rows.append(probe(provider, s, p, args.rounds, args.calls, args.rest, sampler, args.modes))
                    except Exception as exc:  # record, keep going
                        rows.append({"provider": provider, "S": s, "P": p,
                                     "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                        print(rows[-1], flush=True)
                    torch.cuda.empty_cache()
    finally:
        sampler.stop()
    print(f"wrote {write_cases(args.out, args.tag, rows)}")


if __name__ == "__main__":
    main()
