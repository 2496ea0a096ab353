"""What the suites share: result names and files, the environment they record, progress, plots and timing.

Timing: triton.testing.do_bench on CUDA (median of repeated runs between CUDA events, L2 flushed before each),
torch.utils.benchmark on CPU. Functions compared with each other take turns (`bench_alternating`,
`bench_interleaved`), so that a clock change reaches them alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:  # `python benchmarks/<suite>.py` from anywhere finds cpattn and this package
    sys.path.insert(0, ROOT)


# -- names, files, environment ---------------------------------------------------------------------------------


def device_name(device: str | torch.device = "cuda") -> str:
    """The GPU's name for a CUDA device, else "cpu"."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def file_label(name: str) -> str:
    """`name` as a piece of a file name: "NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3"."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name.replace(" x ", "x"))


def results_path(suite: str, device: str, out: str = RESULTS, tag: str = "") -> str:
    """<out>/<suite>_<device><tag>.json: each suite's results name the device they were measured on."""
    return os.path.join(out, f"{suite}_{file_label(device)}{tag}.json")


def environment() -> dict:
    from cpattn.info import environment as env

    out = dict(env())
    out["date"] = time.strftime("%Y-%m-%d %H:%M")
    out["platform"] = platform.platform()
    out["cpu threads"] = torch.get_num_threads()
    import cpattn

    out["providers"] = {n: p.availability().version for n, p in cpattn.PROVIDERS.items() if p.availability().ok}
    out["cpattn"] = _revision()
    out["cpattn_files_sha256"] = files_digest()
    return out


def files_digest(package: str = os.path.join(ROOT, "cpattn")) -> str:
    """sha256 over the package's .py files (relative path and contents, in sorted order): which code ran, even
    where the checkout's git metadata is not that of the files (a copied working tree). `python -c "from
    benchmarks.common import files_digest; print(files_digest())"` at a commit gives that commit's value."""
    import hashlib

    digest = hashlib.sha256()
    for folder, _, names in sorted(os.walk(package)):
        for name in sorted(n for n in names if n.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, package).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


def _revision() -> str:
    """The commit the library was measured at, and whether cpattn/ differed from it."""
    import subprocess

    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "cpattn"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + (" with uncommitted changes to cpattn/" if dirty else "")


def write_results(path: str, payload: dict) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return path


def add_output_arguments(parser) -> None:
    parser.add_argument("--out", default=RESULTS, help="directory for the JSON and PNG (default: %(default)s)")
    parser.add_argument("--tag", default="", help="suffix of the file names, e.g. _rerun")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def progress(items, description: str, enabled: bool = True):
    """`items` with a progress bar (rich) when `enabled` and rich is installed. The bar redraws only as items
    advance, never from a thread of its own, so it takes no host time while a timing runs."""
    items = list(items)
    if not enabled:
        return items
    try:
        from rich.progress import track
    except ImportError:
        return items
    return track(items, description=description, auto_refresh=False, transient=False)


# -- plots -----------------------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is missing (the JSON is written anyway).
    Imported here, not at the top of a suite, so that --help and the JSON need no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def legend_label(text: str) -> str:
    """`text` as a legend entry: matplotlib leaves out labels that start with "_" (as private providers' do)."""
    return "\u200b" + text if text.startswith("_") else text


def save_figure(fig, json_path: str) -> str:
    """The figure as a PNG beside its JSON; its path."""
    png = os.path.splitext(json_path)[0] + ".png"
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    pyplot().close(fig)
    return png


# -- timing ----------------------------------------------------------------------------------------------------


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def flops(b, h, s, d, causal, backward) -> float:
    """4*B*H*S^2*D forward (halved for causal), 3.5 times that for forward+backward."""
    f = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


def bench_gpu(fn, rep_ms: float = 60, warmup_ms: float = 15, min_runs: int = 10) -> dict:
    """Median and spread of `fn` under do_bench, over at least `min_runs` timed runs (do_bench sizes its runs
    from `rep_ms` alone, which gives one or two runs of a 100 ms function: too few for a median)."""
    from triton.testing import do_bench

    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    rep_ms = max(rep_ms, min_runs * start.elapsed_time(end))
    q20, q50, q80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    return {"median_ms": q50, "p20_ms": q20, "p80_ms": q80}


def bench_cpu(fn, min_run_time: float = 0.2) -> dict:
    """Median and spread of `fn` by torch.utils.benchmark (blocks of calls, about `min_run_time` seconds)."""
    from torch.utils.benchmark import Timer

    fn()
    m = Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    times = sorted(t * 1e3 for t in m.times)
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return {"median_ms": m.median * 1e3, "p20_ms": pick(0.2), "p80_ms": pick(0.8)}


def bench(fn, device, warmup_ms: float = 15, cpu_seconds: float = 0.2) -> dict:
    """`bench_gpu` on CUDA, `bench_cpu` on CPU."""
    if torch.device(device).type == "cuda":
        return bench_gpu(fn, warmup_ms=warmup_ms)
    return bench_cpu(fn, cpu_seconds)


def balanced_orders(n: int) -> list[list[int]]:
    """Williams' balanced Latin square: n orders of range(n) in which each index takes each position once and,
    for even n, follows each other index exactly once (odd n: over these orders and their reverses)."""
    first, low, high = [0], 1, n - 1
    while len(first) < n:
        first.append(low)
        low += 1
        if len(first) < n:
            first.append(high)
            high -= 1
    return [[(x + i) % n for x in first] for i in range(n)]


def turn_orders(n: int, turns: int) -> list[list[int]]:
    """The order of each of `turns` rounds or turns: balanced Latin square rows, reversed on alternate passes
    (for odd n each function then follows each other one equally often over 2n turns)."""
    orders = balanced_orders(n)
    return [orders[i % n][::-1] if (i // n) % 2 else orders[i % n] for i in range(turns)]


def bench_alternating(fns: dict, device, rounds: int = 3, warmup_ms: float = 15, cpu_seconds: float = 0.2) -> dict:
    """`bench` of each function in turn, `rounds` times, in `turn_orders`: per function the median of its rounds'
    medians, the rounds' medians and the widest 20th/80th percentiles.

    Timed once each, one after the other, the same kernel called directly and through dispatch can drift apart
    by several percent (clocks move over seconds); in balanced orders each function takes each position and
    follows each other one equally often, so no function always runs after the slowest one. On CUDA
    `warmup_ms` lets each function run alone that long before its timed runs."""
    runs = {name: [] for name in fns}
    items = list(fns.items())
    for order in turn_orders(len(items), rounds):
        for name, fn in (items[j] for j in order):
            runs[name].append(bench(fn, device, warmup_ms, cpu_seconds))
    out = {}
    for name, results in runs.items():
        medians = [r["median_ms"] for r in results]
        out[name] = {"median_ms": statistics.median(medians), "round_medians_ms": medians,
                     "p20_ms": min(r["p20_ms"] for r in results), "p80_ms": max(r["p80_ms"] for r in results)}
    return out


def summarize_calls(call_ms: list[float], chunks: int = 6) -> dict:
    """Median and 20th/80th percentiles of per-call times; `round_medians_ms`: medians of `chunks` consecutive
    runs of calls, to show drift over the measurement as the round-based timing does."""
    ordered = sorted(call_ms)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    chunks = min(chunks, len(call_ms))
    edges = [i * len(call_ms) // chunks for i in range(chunks + 1)]
    parts = [call_ms[a:b] for a, b in zip(edges, edges[1:])]
    return {"median_ms": statistics.median(call_ms), "p20_ms": pick(0.2), "p80_ms": pick(0.8),
            "round_medians_ms": [statistics.median(p) for p in parts], "calls": len(call_ms)}


def paired_ratio(numerator_ms: list[float], denominator_ms: list[float]) -> float:
    """Median over turns of one function's call time over the other's from the same turn."""
    return statistics.median(a / b for a, b in zip(numerator_ms, denominator_ms))


def bench_interleaved(fns: dict, device, warmup_ms: float = 100, budget_ms: float = 2000, min_calls: int = 30,
                      max_calls: int = 600) -> dict:
    """Each function timed call by call, the functions taking turns (one call each per turn, in `turn_orders`).
    On CUDA every call runs after an L2 flush, between CUDA events, as do_bench times a call; on CPU each call is
    timed by time.perf_counter.

    Whole do_bench runs of tens of milliseconds (`bench_alternating`) let a clock change land on one function
    only; here neighbouring calls of different functions are microseconds to milliseconds apart, so drift
    reaches them alike, and `paired_ratio` compares calls of one turn. Each function first runs alone for
    `warmup_ms`; the number of turns fits `budget_ms` in all. Returns, per function, `summarize_calls` of its
    calls plus `call_ms`, the calls in turn order."""
    cuda = torch.device(device).type == "cuda"
    items = list(fns.items())
    per_call = {}
    for name, fn in items:  # warm up alone; the per-call estimate sizes the number of turns
        fn()
        sync(device)
        start, n = time.perf_counter(), 0
        while (time.perf_counter() - start) * 1e3 < warmup_ms or n < 3:
            fn()
            n += 1
            if cuda and n % 8 == 0:
                torch.cuda.synchronize()
        sync(device)
        per_call[name] = (time.perf_counter() - start) * 1e3 / n
    turns = int(min(max_calls, max(min_calls, budget_ms / sum(per_call.values()))))
    cache = torch.empty(256 << 20, dtype=torch.int8, device="cuda") if cuda else None  # do_bench's L2 flush
    times = {name: [] for name, _ in items}
    for order in turn_orders(len(items), turns):
        for name, fn in (items[j] for j in order):
            if cuda:
                cache.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                times[name].append((start, end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    sync(device)
    out = {}
    for name, recorded in times.items():
        call_ms = [s.elapsed_time(e) for s, e in recorded] if cuda else recorded
        out[name] = summarize_calls(call_ms) | {"call_ms": call_ms}
    return out


def bench_queued(fns: dict, rounds: int = 3, calls: int = 15) -> dict:
    """GPU time of each function with the host ahead of the GPU, as inside a model, where earlier layers' kernels
    keep the GPU busy while the host issues this call: before every timed call the GPU is held by a spin kernel
    (torch.cuda._sleep) longer than the host takes to issue the whole call, so the call's kernels are queued by
    the time the start event fires and no launch waits on the host. An L2 flush comes just before the start event,
    as in do_bench. Functions take turns (`turn_orders`), `calls` calls per turn; per function the median of every
    call and the median of each round. Host-bound idle time is what this leaves out of `bench`'s timings."""
    items = list(fns.items())
    cache = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    cycles = _spin_cycles(1.3 * max(host_ms(fn, "cuda") for _, fn in items) + 1.0)
    times = {name: [] for name, _ in items}
    for order in turn_orders(len(items), rounds):
        for name, fn in (items[j] for j in order):
            recorded = []
            for _ in range(calls):
                torch.cuda._sleep(cycles)
                cache.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                recorded.append((start, end))
            sync("cuda")
            times[name].append([s.elapsed_time(e) for s, e in recorded])
    out = {}
    for name, per_round in times.items():
        every = [t for r in per_round for t in r]
        out[name] = {"median_ms": statistics.median(every),
                     "round_medians_ms": [statistics.median(r) for r in per_round],
                     "p20_ms": statistics.quantiles(every, n=5)[0], "p80_ms": statistics.quantiles(every, n=5)[3]}
    return out


def _spin_cycles(ms: float) -> int:
    """torch.cuda._sleep's cycle count that holds this GPU for about `ms` (measured: clocks differ by GPU)."""
    probe = 1 << 20
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(probe)  # the first spin pays its launch setup
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    sync("cuda")
    return int(probe * ms / max(start.elapsed_time(end), 1e-3))


def capture_graph(fn, warmups: int = 3):
    """(CUDA graph of one call of `fn`, what that call returned): `fn` runs `warmups` times on a side stream
    first, where capture wants its lazy setup (compilation, workspaces) done."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def replay_us(graph, replays: int = 200) -> float:
    """GPU time per replay of `graph`, `replays` back to back between two events (no host time, no launch gaps)."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def host_ms(fn, device, repeats: int = 5) -> float:
    """Median host time to issue `fn`'s work (the GPU is drained first, so a full launch queue never blocks)."""
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    sync(device)
    return statistics.median(times)


def per_call_us(fns: dict, n: int = 1000) -> dict:
    """Median host time in us of one call of each function, the functions alternating call by call so that both
    see the same machine state. On CUDA the GPU is drained every 32 calls, untimed: a launch queue that fills
    up makes the host wait for the GPU, and the time measured would be kernel time."""
    cuda = torch.cuda.is_available()
    times = {name: [] for name in fns}
    for i in range(n):
        if cuda and i % 32 == 0:
            torch.cuda.synchronize()
        for name, fn in fns.items():
            t0 = time.perf_counter_ns()
            fn()
            times[name].append(time.perf_counter_ns() - t0)
    if cuda:
        torch.cuda.synchronize()
    return {name: statistics.median(t) / 1e3 for name, t in times.items()}


def error_text(exc: BaseException) -> str:
    """How a failed measurement is recorded: the suite keeps going with the next one."""
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def profile_call(fn, cpu: bool = True, warm: bool = True):
    """torch.profiler's trace of one call of `fn` on CUDA, synchronised (`warm`: after one call unprofiled), the
    host's ops included unless `cpu` is False."""
    from torch.profiler import ProfilerActivity, profile

    if warm:
        fn()
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cpu else [ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    return prof


def kernel_summary(events, top: int) -> dict:
    """Kernel time of a profiler's `key_averages()`, and its `top` kernels by time."""
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    return {"kernel_ms": sum(e.self_device_time_total for e in kernels) / 1e3,
            "top_kernels": [{"name": e.key[:90], "count": e.count, "ms": e.self_device_time_total / 1e3}
                            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]]}


def gpu_idle(prof, top: int, exclude=None) -> dict:
    """From a torch.profiler trace: the time between the first kernel's start and the last one's end in which no
    kernel ran, and its largest gaps with the kernels on either side (the GPU waiting on the host, or launch
    latency). `exclude(name)`: kernels left out (NCCL's, which span a whole transfer on their own stream)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type.name == "CUDA" and not (exclude and exclude(e.name)))
    if not spans:
        return {}
    gaps, busy_until, before = [], spans[0][1], spans[0][2]
    for start, end, name in spans[1:]:
        if start > busy_until:
            gaps.append((start - busy_until, before[:60], name[:60]))
        if end > busy_until:
            busy_until, before = end, name
    idle = sum(g for g, _, _ in gaps)
    return {"gpu_span_ms": (busy_until - spans[0][0]) / 1e3, "gpu_idle_ms": idle / 1e3, "gpu_gaps": len(gaps),
            "largest_gaps": [{"us": g, "after": a, "before": b} for g, a, b in sorted(gaps, reverse=True)[:top]]}
