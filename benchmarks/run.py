"""Benchmarks: kernels, dispatch overhead, ring split efficiency, memory. Results as JSON, markdown and PNG.

    python -m benchmarks.run --suite gpu     # on a GPU: kernels, overhead, ring split, memory
    python -m benchmarks.run --suite cpu     # CPU: dispatch overhead and a small gloo CP run (CI-sized)

Timing uses triton.testing.do_bench (median of repeated runs, CUDA events) on fresh random inputs. FLOPs:
4*B*H*S^2*D forward (halved for causal), 3.5x that for forward+backward. Nothing here asserts speed: the
summary records each target's measured value, met or not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cpattn  # noqa: E402
from cpattn.cp.comm import CommStats, LoopbackRing  # noqa: E402
from cpattn.cp.mesh import Group  # noqa: E402
from cpattn.cp.ring import RingSpec, ring_backward, ring_forward_keeping_last  # noqa: E402
from cpattn.dispatch import make_call  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def progress(iterable, description: str):
    try:
        from rich.progress import track

        return track(list(iterable), description=description)
    except ImportError:
        return iterable


def flops(b, h, s, d, causal, backward) -> float:
    f = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


def bench_gpu(fn, rep_ms=60, warmup_ms=15, min_runs=10) -> dict:
    """Median and spread of `fn` over at least `min_runs` timed runs (do_bench sizes its runs from `rep_ms`
    alone, which gives one or two runs of a 100 ms function: too few for a median)."""
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


def bench_alternating(fns: dict, rounds: int = 3, warmup_ms: float = 15) -> dict:
    """`bench_gpu` of each function in turn, `rounds` times: the median of the rounds' medians per function.

    Timed once each, one after the other, the same cuDNN kernel called directly and through dispatch gave ratios
    from 0.99 to 1.10 in one H100 run (clocks drift over seconds); alternating exposes both to the same drift.
    Round i runs the functions in the order of a balanced Latin square (two functions: plain alternation), so
    over len(fns) rounds each function takes each position once and follows each other one once. Rotated by one
    each round, `auto` followed `_native_efficient` (the slowest, longest-running kernel) in 5 of 6 rounds and measured
    2-5% slower than `flash`, the same kernel through the same runner, at S=16k in 7 of 8 shapes (H100);
    `warmup_ms` lets each function run alone that long before its timed runs."""
    runs = {name: [] for name in fns}
    items = list(fns.items())
    orders = balanced_orders(len(items))
    for i in range(rounds):
        order = orders[i % len(items)]
        if (i // len(items)) % 2:  # odd n needs the reversed orders too for each function to follow each other
            order = order[::-1]
        for name, fn in (items[j] for j in order):
            runs[name].append(bench_gpu(fn, warmup_ms=warmup_ms))
    out = {}
    for name, results in runs.items():
        medians = [r["median_ms"] for r in results]
        out[name] = {"median_ms": statistics.median(medians), "round_medians_ms": medians,
                     "p20_ms": min(r["p20_ms"] for r in results), "p80_ms": max(r["p80_ms"] for r in results)}
    return out


def turn_orders(n: int, turns: int) -> list[list[int]]:
    """The order of each turn of `bench_interleaved`: balanced Latin square rows, reversed on alternate passes
    (for odd n each function then follows each other one equally often)."""
    orders = balanced_orders(n)
    return [orders[i % n][::-1] if (i // n) % 2 else orders[i % n] for i in range(turns)]


def summarize_calls(call_ms: list[float], chunks: int = 6) -> dict:
    """Median and 20th/80th percentiles of per-call times; `round_medians_ms`: medians of `chunks` consecutive
    runs of calls, to show drift over the measurement as the round-based timing does."""
    ordered = sorted(call_ms)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    size = max(1, len(call_ms) // chunks)
    parts = [call_ms[i:i + size] for i in range(0, len(call_ms) - size + 1, size)]
    return {"median_ms": statistics.median(call_ms), "p20_ms": pick(0.2), "p80_ms": pick(0.8),
            "round_medians_ms": [statistics.median(p) for p in parts], "calls": len(call_ms)}


def paired_ratio(numerator_ms: list[float], denominator_ms: list[float]) -> float:
    """Median over turns of one function's call time over the other's from the same turn."""
    return statistics.median(a / b for a, b in zip(numerator_ms, denominator_ms))


def bench_interleaved(fns: dict, warmup_ms: float = 100, budget_ms: float = 2000, min_calls: int = 30,
                      max_calls: int = 600) -> dict:
    """Each function timed call by call, the functions taking turns (one call each per turn, in `turn_orders`),
    every call after an L2 flush and between CUDA events, as do_bench times a call.

    `bench_alternating` gives each function whole do_bench runs of tens of milliseconds, so a clock change between
    runs lands on one function only: the same FA4 runner timed twice there measured 0.953-1.042 of itself over 24
    shapes on an H100, wider than the 2% it was asked to resolve. Here neighbouring calls of different functions
    are microseconds to milliseconds apart, so drift reaches them alike, and `paired_ratio` compares calls of one
    turn. Each function first runs alone for `warmup_ms`; the number of turns fits `budget_ms` in all.
    Returns, per function, `summarize_calls` of its calls plus `call_ms`, the calls in turn order."""
    items = list(fns.items())
    per_call = {}
    for name, fn in items:  # warm up alone; the per-call estimate sizes the number of turns
        fn()
        torch.cuda.synchronize()
        start, n = time.perf_counter(), 0
        while (time.perf_counter() - start) * 1e3 < warmup_ms or n < 3:
            fn()
            n += 1
            if n % 8 == 0:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        per_call[name] = (time.perf_counter() - start) * 1e3 / n
    turns = int(min(max_calls, max(min_calls, budget_ms / sum(per_call.values()))))
    cache = torch.empty(256 << 20, dtype=torch.int8, device="cuda")  # do_bench's L2 flush
    events = {name: [] for name, _ in items}
    for order in turn_orders(len(items), turns):
        for name, fn in (items[j] for j in order):
            cache.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize()
    out = {}
    for name, pairs in events.items():
        call_ms = [start.elapsed_time(end) for start, end in pairs]
        out[name] = summarize_calls(call_ms) | {"call_ms": call_ms}
    return out


def bench_functions(fns: dict, timing: str, rounds: int, warmup_ms: float = 15) -> dict:
    """`bench_alternating` ("rounds") or `bench_interleaved` ("interleaved", with its per-call `call_ms`)."""
    if timing == "interleaved":
        return bench_interleaved(fns, warmup_ms=max(warmup_ms, 100))
    return bench_alternating(fns, rounds, warmup_ms)


# -- direct calls: each library as a user would call it without cpattn -----------------------------------


def direct_callable(provider: str, q, k, v, causal: bool):
    """The provider's kernel called directly in its native layout; None if not measured directly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"_native_flash": SDPBackend.FLASH_ATTENTION, "_native_efficient": SDPBackend.EFFICIENT_ATTENTION,
                "_native_cudnn": SDPBackend.CUDNN_ATTENTION, "_native_math": SDPBackend.MATH}
    sdpa = torch._C._nn.scaled_dot_product_attention
    if provider in backends:
        backend = backends[provider]

        def run():
            with sdpa_kernel(backend):
                return sdpa(q, k, v, is_causal=causal)
        return run, (q, k, v)
    if provider == "native":
        return (lambda: sdpa(q, k, v, is_causal=causal)), (q, k, v)
    if provider == "flash":
        from flash_attn.cute import flash_attn_func

        qs, ks, vs = (t.transpose(1, 2).contiguous().detach().requires_grad_(t.requires_grad) for t in (q, k, v))
        return (lambda: flash_attn_func(qs, ks, vs, causal=causal)[0]), (qs, ks, vs)
    if provider == "sage":
        from sageattention import sageattn

        return (lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=causal)), (q, k, v)
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention)
        s = q.shape[2]
        block = create_block_mask(lambda b, h, i, j: i >= j, None, None, s, s, device=q.device) if causal else None
        return (lambda: compiled(q, k, v, block_mask=block)), (q, k, v)
    return None


def kernels_suite(providers, seqs, head_dims, batch_heads_tokens, rounds: int = 3, timing: str = "rounds") -> list[dict]:
    rows = []
    device = torch.device("cuda")
    combos = [(p, d, s, c) for p in providers for d in head_dims for s in seqs for c in (False, True)]
    for provider, d, s, causal in progress(combos, "kernels"):
        adapter = cpattn.get_provider(provider)  # "auto" too: it is measured against the best provider per shape
        caps = adapter.capabilities("cuda")
        h = 16
        b = max(1, batch_heads_tokens // (h * s))
        for backward in (False, True) if caps.training else (False,):
            row = {"provider": provider, "B": b, "H": h, "S": s, "D": d, "causal": causal, "backward": backward}
            try:
                q, k, v = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, requires_grad=backward)
                           for _ in range(3))
                call = make_call(q, k, v, None, 0.0, causal, None, False)
                if adapter.reasons(call):
                    continue
                dout = torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16)

                def via_dispatch():
                    with cpattn.attention_provider(provider):
                        out = cpattn.attention_dispatch(q, k, v, is_causal=causal)
                    if backward:
                        out.backward(dout)
                timed = {"dispatch": via_dispatch}
                direct = direct_callable(provider, q, k, v, causal)
                if direct is not None:
                    fn, inputs = direct
                    dout_direct = dout if inputs[0].shape == q.shape else dout.transpose(1, 2).contiguous()

                    def run_direct():
                        out = fn()
                        if backward:
                            out.backward(dout_direct)
                    timed["direct"] = run_direct
                row.update(bench_functions(timed, timing, rounds))
                row["timing"] = timing
                f = flops(b, h, s, d, causal, backward)
                for key in ("dispatch", "direct"):
                    if key in row:
                        row[key]["tflops"] = f / (row[key]["median_ms"] * 1e-3) / 1e12
                if "direct" in row:
                    row["dispatch_vs_direct"] = row["direct"]["median_ms"] / row["dispatch"]["median_ms"]
                    # paired: each round's ratio, so a clock change between rounds cancels; their median
                    ratios = [a / b for a, b in zip(row["direct"]["round_medians_ms"],
                                                    row["dispatch"]["round_medians_ms"])]
                    row["round_ratios"] = ratios
                    row["dispatch_vs_direct_paired"] = statistics.median(ratios)
                    if timing == "interleaved":  # calls of one turn
                        row["dispatch_vs_direct_paired"] = paired_ratio(row["direct"]["call_ms"],
                                                                        row["dispatch"]["call_ms"])
                for key in ("dispatch", "direct"):
                    row.get(key, {}).pop("call_ms", None)
            except Exception as exc:  # record, keep going
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rows.append(row)
            del q, k, v
            torch.cuda.empty_cache()
    return rows


# -- auto vs every provider it chooses among -------------------------------------------------------------


AUTO_CANDIDATES = ("flash", "_native_cudnn", "_native_flash", "_native_efficient")


def auto_suite(seqs, head_dims, batch_heads_tokens, timing: str = "rounds") -> list[dict]:
    """Per shape, 'auto' (fixed order), 'auto' autotuned and each candidate that takes the call, all through
    attention_dispatch, timed in alternating rounds; what each 'auto' chose; each one's time over the best
    candidate's. The autotuned choice is made on the first (untimed) call, as in a training loop."""
    from cpattn.providers import AUTO_TUNED

    rows = []
    device = torch.device("cuda")
    auto = cpattn.get_provider("auto")
    combos = [(d, s, c, bw) for d in head_dims for s in seqs for c in (False, True) for bw in (False, True)]
    for d, s, causal, backward in progress(combos, "auto"):
        h = 16
        b = max(1, batch_heads_tokens // (h * s))
        row = {"B": b, "H": h, "S": s, "D": d, "causal": causal, "backward": backward}
        try:
            q, k, v = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, requires_grad=backward)
                       for _ in range(3))
            dout = torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16)
            call = make_call(q, k, v, None, 0.0, causal, None, False)
            row["chosen"] = auto.choose(call).name

            def via(name, **options):
                def run():
                    with cpattn.attention_provider(name, **options):
                        out = cpattn.attention_dispatch(q, k, v, is_causal=causal)
                    if backward:
                        out.backward(dout)
                return run
            names = [n for n in AUTO_CANDIDATES
                     if cpattn.PROVIDERS[n].availability().ok and not cpattn.PROVIDERS[n].reasons(call)]
            fns = {"auto": via("auto"), "auto_tuned": via("auto", autotune=True)} | {n: via(n) for n in names}
            # at least six rounds: at S <= 4k one FA4 call measured 1.12 ms in one round and 1.84 ms in the next
            # (H100); 100 ms alone before each timing, so the one before it (up to 28 ms a call) does not set the
            # clocks it runs at
            times = bench_functions(fns, timing, rounds=max(6, len(fns)), warmup_ms=100)
            row["timing"] = timing
            row["chosen_tuned"] = AUTO_TUNED.choose(call).name
            row["tuning_ms"] = AUTO_TUNED.timings(call)
            row["median_ms"] = {n: t["median_ms"] for n, t in times.items()}
            row["round_medians_ms"] = {n: t["round_medians_ms"] for n, t in times.items()}
            best = min(names, key=lambda n: row["median_ms"][n])
            row["best"], row["auto_vs_best"] = best, row["median_ms"][best] / row["median_ms"]["auto"]
            row["tuned_vs_best"] = row["median_ms"][best] / row["median_ms"]["auto_tuned"]
            if row["chosen"] in names:  # the same runner timed twice: how far apart this method puts equal work
                row["auto_vs_chosen"] = row["median_ms"][row["chosen"]] / row["median_ms"]["auto"]
            if timing == "interleaved":  # the same ratios from calls of one turn
                calls = {n: t["call_ms"] for n, t in times.items()}
                row["auto_vs_best_paired"] = paired_ratio(calls[best], calls["auto"])
                if row["chosen"] in names:
                    row["auto_vs_chosen_paired"] = paired_ratio(calls[row["chosen"]], calls["auto"])
                row["calls"] = {n: t["calls"] for n, t in times.items()}
        except Exception as exc:  # record, keep going
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


# -- dispatch overhead ----------------------------------------------------------------------------------


OVERHEAD_PROVIDERS = {"cuda": ("_native_cudnn", "flash"), "cpu": ("_native_flash",)}


def _small_direct_call(provider: str, q, k, v):
    """A cached-shape call of the provider's kernel without cpattn: the aten op (native), or flash_attn_func on
    (B, S, H, D) tensors, the layout a FlashAttention user holds."""
    aten = torch.ops.aten
    if provider == "_native_cudnn":
        return lambda: aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, True, False)[0]
    if provider == "_native_flash":
        return lambda: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0]
    from flash_attn.cute import flash_attn_func

    qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return lambda: flash_attn_func(qs, ks, vs, causal=True)[0]


def host_overhead(device: str, provider: str, n: int = 2000) -> dict:
    """Host time per call, median, through attention_dispatch vs the provider's direct call (causal, a small
    shape so that the host, not the GPU, sets the pace); and on CUDA the kernels each launches, forward and
    forward+backward."""
    head_dim = 64 if provider == "flash" else 16
    q, k, v = (torch.randn(1, 2, 128 if provider == "flash" else 16, head_dim, device=device,
                           dtype=torch.bfloat16 if device == "cuda" else torch.float32) for _ in range(3))
    direct = _small_direct_call(provider, q, k, v)

    def via():
        return cpattn.attention_dispatch(q, k, v, is_causal=True)

    def per_call(first, second):
        """Host time of each call. The two functions alternate so that both see the same machine state, and the
        GPU is drained every 32 pairs, untimed: a launch queue that fills up makes the host wait for the GPU,
        and the time measured would be kernel time (tiny attention kernels take about as long as a launch)."""
        times = ([], [])
        for i in range(n):
            if device == "cuda" and i % 32 == 0:
                torch.cuda.synchronize()
            for fn, out in ((first, times[0]), (second, times[1])):
                t0 = time.perf_counter_ns()
                fn()
                out.append(time.perf_counter_ns() - t0)
        return times

    with cpattn.attention_provider(provider):
        for _ in range(200):
            via()
            direct()
        if device == "cuda":
            torch.cuda.synchronize()
        d_times, v_times = per_call(direct, via)
        if device == "cuda":
            torch.cuda.synchronize()
        kernels = kernel_counts(direct, via) if device == "cuda" else None
        kernels_bwd = training_kernel_counts(provider, q, k, v) if device == "cuda" else None
    p50_direct, p50_via = statistics.median(d_times) / 1e3, statistics.median(v_times) / 1e3
    return {"device": device, "provider": provider, "direct_us_p50": p50_direct, "dispatch_us_p50": p50_via,
            "overhead_us_p50": p50_via - p50_direct, "kernels": kernels, "kernels_fwd_bwd": kernels_bwd}


def kernel_counts(direct, via) -> dict:
    """GPU activities (kernels, memsets, copies) one call of each launches, warm."""
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    for name, fn in (("direct", direct), ("dispatch", via)):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        counts[name] = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    return counts


def training_kernel_counts(provider: str, q, k, v) -> dict:
    """kernel_counts of forward+backward: the direct call (kernels suite's, in the library's own layout) on leaf
    tensors, against dispatch on (B, H, S, D) leaves; a layout copy on either path would show here."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)
    fn, inputs = direct_callable(provider, q, k, v, True)
    dout_direct = dout if inputs[0].shape == q.shape else dout.transpose(1, 2).contiguous()

    def direct():
        fn().backward(dout_direct)

    def via():
        cpattn.attention_dispatch(q, k, v, is_causal=True).backward(dout)
    return kernel_counts(direct, via)


# -- ring split efficiency -------------------------------------------------------------------------------


def ring_split_case(provider: str, s: int, p: int, backward: bool, causal=True, h=16, d=128, step_streams=None):
    """(whole, split): one kernel call on the whole sequence, and all P ranks' ring block kernels and merges one
    after another on this GPU with no communication (each rank 'receives' the blocks from a loopback). `whole`
    returns dQ (the output without `backward`); `split` each rank's, in zigzag order (only dQ is meaningful: a
    loopback brings no other rank's dK/dV parts). `step_streams`: the backward's streams (RingSpec's default
    when None)."""
    adapter = cpattn.PROVIDERS[provider]
    device = torch.device("cuda")
    q, k, v = (torch.randn(1, h, s, d, device=device, dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    full = make_call(q, k, v, None, 0.0, causal, None, False)
    out, lse = adapter.forward(full)

    def whole():
        o, l_ = adapter.forward(full)
        return adapter.backward(full, dout, o, l_)[0] if backward else o
    shards = [cpattn.cp.layout.ring_positions(s, p, r, "zigzag", device) for r in range(p)]
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
            call = make_call(lq, lk, lv, None, 0.0, causal, None, False)
            # dtypes as RingAttention asks for them, and its backward starts on the forward's last block
            o, _, last = ring_forward_keeping_last(adapter, call, spec, lq.dtype)
            results.append(ring_backward(adapter, call, spec, ldo, lo, ll, lq.dtype, last)[0] if backward else o)
        return results
    return whole, split


def ring_split_suite(provider: str, seqs, parts, causal=True, timing: str = "rounds") -> list[dict]:
    """All P ranks' block kernels and merges run one after another on one GPU vs one whole-sequence call."""
    rows = []
    h, d = 16, 128
    for s, p, backward in progress([(s, p, bw) for s in seqs for p in parts for bw in (False, True)], "ring split"):
        row = {"provider": provider, "S": s, "P": p, "causal": causal, "backward": backward, "H": h, "D": d}
        try:
            whole, split = ring_split_case(provider, s, p, backward, causal, h, d)
            # alternating rounds: the same whole-sequence call measured 94.6 to 97.6 ms in one H100 run when
            # timed once per case, a spread as large as the gap being measured
            if timing == "interleaved":  # whole and split take turns call by call
                times = bench_interleaved({"whole": whole, "split": split}, budget_ms=6000, min_calls=12)
                row["efficiency_paired"] = paired_ratio(times["whole"].pop("call_ms"), times["split"].pop("call_ms"))
            else:
                times = bench_alternating({"whole": whole, "split": split})
            row["whole"], row["split"], row["timing"] = times["whole"], times["split"], timing
            row["efficiency"] = row["whole"]["median_ms"] / row["split"]["median_ms"]
            row["round_efficiencies"] = [w / x for w, x in zip(times["whole"]["round_medians_ms"],
                                                               times["split"]["round_medians_ms"])]
            row["split_host_ms"] = host_ms(split)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def host_ms(fn, repeats: int = 5) -> float:
    """Median host time to issue `fn`'s work (the GPU is drained first, so a full launch queue never blocks)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


# -- memory (several ranks on one device) -----------------------------------------------------------------


def _memory_worker(rank, world, port, device_type, total, schedule, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    device = torch.device(device_type)
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    torch.manual_seed(0)
    h, d = 8, 64
    s_local = cpattn.cp.layout.local_len(total, world, 1, rank, 0, "zigzag")
    q, k, v = (torch.randn(1, h, s_local, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    provider = "native"
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with cpattn.attention_provider(provider, cp_mesh=dist.group.WORLD, cp_strategy=schedule):
        out = cpattn.attention_dispatch(q, k, v, is_causal=True)
        out.sum().backward()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device_type == "cuda" else None
    queue.put((rank, peak))
    dist.destroy_process_group()


def memory_suite(device_type: str, world: int, total: int) -> list[dict]:
    import socket

    import torch.multiprocessing as mp

    rows = []
    for schedule in ("ring", "ulysses", "allgather"):
        ctx = mp.get_context("spawn")
        queue = ctx.SimpleQueue()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        procs = [ctx.Process(target=_memory_worker, args=(r, world, port, device_type, total, schedule, queue))
                 for r in range(world)]
        [p.start() for p in procs]
        [p.join(timeout=300) for p in procs]
        peaks = [queue.get()[1] for _ in range(world) if not queue.empty()]
        rows.append({"schedule": schedule, "world": world, "total_seq": total, "peak_mb_per_rank": peaks})
    return rows


# -- driver ------------------------------------------------------------------------------------------------


def environment() -> dict:
    from cpattn.info import environment as env

    out = env()
    out["date"] = time.strftime("%Y-%m-%d %H:%M")
    out["platform"] = platform.platform()
    out["providers"] = {n: p.availability().version for n, p in cpattn.PROVIDERS.items() if p.availability().ok}
    return out


def write_cases(out_dir: str, tag: str, cases: list[dict]) -> str:
    """`cases` with the environment and date as <out_dir>/<tag>.json (the probe scripts' results); its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{tag}.json")
    with open(path, "w") as f:
        json.dump({"environment": environment(), "date": time.strftime("%Y-%m-%d %H:%M"), "cases": cases}, f,
                  indent=1, default=str)
    return path


def gpu_training_providers() -> list[str]:
    names = []
    for name in ("flash", "_native_cudnn", "_native_flash", "_native_efficient", "flex", "sage"):
        p = cpattn.PROVIDERS[name]
        caps = p.capabilities("cuda")
        if p.availability().ok and caps is not None and torch.cuda.get_device_capability() >= (
                caps.min_compute_capability or (0, 0)):
            names.append(name)
    return names


def run_gpu(args) -> dict:
    providers = args.providers or gpu_training_providers()
    only = set(args.only or ("overhead", "kernels", "auto", "ring_split", "memory"))
    result = {"environment": environment()}
    if "overhead" in only:
        result["overhead"] = [host_overhead(device, p) for device in ("cuda", "cpu")
                              for p in OVERHEAD_PROVIDERS[device] if cpattn.PROVIDERS[p].availability().ok]
    if "kernels" in only:
        result["kernels"] = kernels_suite(providers, args.seqs, args.head_dims, args.tokens, args.rounds, args.timing)
    if "auto" in only:
        result["auto"] = auto_suite(args.auto_seqs, args.head_dims, args.tokens, args.timing)
    if "ring_split" in only:
        result["ring_split"] = [row for causal in args.split_causal
                                for p in args.split_providers or ["flash", "_native_cudnn"]
                                if p in cpattn.PROVIDERS and cpattn.PROVIDERS[p].availability().ok
                                for row in ring_split_suite(p, args.split_seqs, args.split_parts, causal == "causal",
                                                            args.timing)]
    if "memory" in only:
        result["memory"] = memory_suite("cuda", 4, 32768)
    return result


def run_cpu(args) -> dict:
    result = {"environment": environment(), "overhead": [host_overhead("cpu", "_native_flash")]}
    result["memory"] = memory_suite("cpu", 2, 4096)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("gpu", "cpu"), required=True)
    parser.add_argument("--providers", nargs="*")
    parser.add_argument("--seqs", type=int, nargs="*", default=[1024, 2048, 4096, 16384, 65536])
    parser.add_argument("--head-dims", type=int, nargs="*", default=[128, 64])
    parser.add_argument("--tokens", type=int, default=16 * 16384, help="B*H*S per kernel measurement")
    parser.add_argument("--split-seqs", type=int, nargs="*", default=[16384, 65536, 131072])
    parser.add_argument("--split-causal", nargs="*", choices=("causal", "noncausal"), default=["causal"],
                        help="ring split masks: zigzag causal (the default), and/or none")
    parser.add_argument("--only", nargs="*", choices=("overhead", "kernels", "auto", "ring_split", "memory"))
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per kernels-suite case")
    parser.add_argument("--timing", choices=("rounds", "interleaved"), default="rounds",
                        help="kernels, auto and ring split suites: do_bench runs in alternating rounds, or calls taking turns")
    parser.add_argument("--auto-seqs", type=int, nargs="*", default=[2048, 4096, 16384])
    parser.add_argument("--split-providers", nargs="*")
    parser.add_argument("--split-parts", type=int, nargs="*", default=[2, 4, 8], help="ring split block counts P")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    result = run_gpu(args) if args.suite == "gpu" else run_cpu(args)
    os.makedirs(args.out, exist_ok=True)
    device = result["environment"].get("gpu", "cpu").replace(" ", "_")
    tag = args.tag or f"{args.suite}_{device}"
    path = os.path.join(args.out, f"bench_{tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    from benchmarks.report import write_report

    write_report(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
