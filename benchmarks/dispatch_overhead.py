"""Dispatch overhead: the host time cpattn.attention_dispatch adds to a call over SDPA and over the bare kernel.

    python benchmarks/dispatch_overhead.py                    # CPU, and CUDA when present
    python benchmarks/dispatch_overhead.py --devices cpu --rounds 9 --calls 5000
    python benchmarks/dispatch_overhead.py --profile          # and cProfile's top functions of each dispatch
    python benchmarks/dispatch_overhead.py --smoke            # a few hundred calls: does the suite run

Per device and provider, on the same tensors (shapes small enough that the host, not the kernel, sets the pace):
  sdpa              F.scaled_dot_product_attention
  kernel            the kernel the provider runs, called without cpattn (`KERNELS`: the aten op; for `native`
                    F.scaled_dot_product_attention's C entry, which it calls; for `flash`, flash_attn_func on
                    (B, S, H, D) tensors, the layout a FlashAttention user holds)
  runner            the function the provider cached for this call's signature: dispatch without its lookup
  dispatch          cpattn.attention_dispatch inside attention_provider(provider)
  dispatch_default  (native only) attention_dispatch with no attention_provider block, as a drop-in is called
CPU (default B1 H1 S8 D8 float32): every round times `--calls` calls of each function back to back
(time.perf_counter around the loop, garbage collection off) in balanced orders; a function's figure is the
median over rounds of its time per call. CUDA (default B1 H2 S128 D64 bfloat16): every call is timed alone
and the GPU drained every 32 calls (`per_call_us`), since a full launch queue would make the host wait on the
GPU; and torch.profiler counts the GPU activities one call of each function launches.
`added_us`: dispatch's median minus sdpa's, kernel's and runner's; `added_us_paired`: the median over rounds of
the same differences within one round. On CPU `thread_cpu_time` holds the same figures from the thread's CPU
time (time.thread_time), which leaves out time other processes held the core.
Writes dispatch_overhead_<device>.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

PROVIDERS = {"cpu": ("native", "_native_flash", "_native_math"),
             "cuda": ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flash")}
SHAPES = {"cpu": (1, 1, 8, 8), "cuda": (1, 2, 128, 64)}
DTYPES = {"cpu": "float32", "cuda": "bfloat16"}


def kernel_call(provider: str, q, k, v, causal: bool):
    """(name, function) of the kernel `provider` runs on these tensors, called without cpattn; None if unknown."""
    aten = torch.ops.aten
    cuda = q.is_cuda
    if provider == "native":
        sdpa = torch._C._nn.scaled_dot_product_attention
        return "torch._C._nn.scaled_dot_product_attention", lambda: sdpa(q, k, v, None, 0.0, causal)
    if provider == "_native_math":
        op = aten._scaled_dot_product_attention_math.default
        return "aten._scaled_dot_product_attention_math", lambda: op(q, k, v, None, 0.0, causal)[0]
    if provider == "_native_flash" and not cuda:
        op = aten._scaled_dot_product_flash_attention_for_cpu.default
        return "aten._scaled_dot_product_flash_attention_for_cpu", lambda: op(q, k, v, 0.0, causal)[0]
    if provider == "_native_flash":
        op = aten._scaled_dot_product_flash_attention.default
        return "aten._scaled_dot_product_flash_attention", lambda: op(q, k, v, 0.0, causal, False)[0]
    if provider == "_native_efficient":
        op = aten._scaled_dot_product_efficient_attention.default
        return "aten._scaled_dot_product_efficient_attention", lambda: op(q, k, v, None, False, 0.0, causal)[0]
    if provider == "_native_cudnn":
        op = aten._scaled_dot_product_cudnn_attention.default
        return "aten._scaled_dot_product_cudnn_attention", lambda: op(q, k, v, None, False, 0.0, causal, False)[0]
    if provider == "flash":
        from flash_attn.cute import flash_attn_func

        qs, ks, vs = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        return "flash_attn.cute.flash_attn_func (B, S, H, D)", lambda: flash_attn_func(qs, ks, vs, causal=causal)[0]
    return None



def functions(provider: str, q, k, v, causal: bool) -> tuple[dict, dict]:
    """({label: function}, {label: what it calls}) for one provider. Dispatch runs once first, so that the
    provider has accepted the call and cached its runner, as in any loop after its first step."""
    import cpattn
    import torch.nn.functional as F
    from cpattn.call import call_signature

    with cpattn.attention_provider(provider):
        cpattn.attention_dispatch(q, k, v, is_causal=causal)
    runner = cpattn.get_provider(provider).accepted_runner(call_signature(q, k, v, None, 0.0, causal, None, False))
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
    names = {"sdpa": "torch.nn.functional.scaled_dot_product_attention"}
    kernel = kernel_call(provider, q, k, v, causal)
    if kernel is not None:
        names["kernel"], fns["kernel"] = kernel
    if runner is not None:
        fns["runner"], names["runner"] = (lambda: runner(q, k, v, None)), f"{provider}'s cached runner"
    fns["dispatch"] = lambda: cpattn.attention_dispatch(q, k, v, is_causal=causal)
    names["dispatch"] = f"cpattn.attention_dispatch inside attention_provider({provider!r})"
    if provider == "native" and os.environ.get("CPATTN_PROVIDER", "native") in ("", "native"):
        fns["dispatch_default"] = fns["dispatch"]  # the same call, timed with no provider block open
        names["dispatch_default"] = "cpattn.attention_dispatch, no attention_provider block (native by default)"
    return fns, names


def scope(provider: str, name: str):
    """What a function's timing runs inside: the provider's block for `dispatch`, nothing for the others."""
    import contextlib

    import cpattn

    return cpattn.attention_provider(provider) if name == "dispatch" else contextlib.nullcontext()


def back_to_back_us(fn, calls: int) -> tuple[float, float]:
    """(wall, thread CPU) us per call of `calls` calls of `fn` in one loop, with the garbage collector off (as
    timeit runs it), so that no collection lands inside one function's loop and not another's. The thread's CPU
    time leaves out the time other processes held the core, which wall time counts on a busy machine."""
    gc.disable()
    try:
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            fn()
        c1, t1 = time.thread_time(), time.perf_counter()
        return (t1 - t0) / calls * 1e6, (c1 - c0) / calls * 1e6
    finally:
        gc.enable()


def time_rounds(fns: dict, provider: str, device: str, calls: int, rounds: int) -> tuple[dict, dict, list]:
    """Per function its wall us per call in each round (CPU: also thread CPU us), the functions in
    `turn_orders`; and each round's order. CPU: `calls` calls back to back; CUDA: `per_call_us`'s median of
    `calls` calls timed one by one."""
    def measure(fn):
        if device == "cuda":
            return common.per_call_us({"fn": fn}, calls)["fn"], None
        return back_to_back_us(fn, calls)

    items = list(fns.items())
    for name, fn in items:  # warm-up: caches, allocator, the provider's runner
        with scope(provider, name):
            for _ in range(max(50, calls // 10)):
                fn()
    common.sync(device)
    wall, cpu, orders = {name: [] for name in fns}, {name: [] for name in fns}, []
    for order in common.turn_orders(len(items), rounds):
        orders.append([items[j][0] for j in order])
        for name, fn in (items[j] for j in order):
            with scope(provider, name):
                wall_us, cpu_us = measure(fn)
            wall[name].append(wall_us)
            cpu[name].append(cpu_us)
    return wall, (cpu if device == "cpu" else None), orders


def added(per_round: dict) -> tuple[dict, dict]:
    """(from medians, paired within rounds): each dispatch's us per call over sdpa, kernel and runner."""
    medians = {name: statistics.median(us) for name, us in per_round.items()}
    plain, paired = {}, {}
    for name in ("dispatch", "dispatch_default"):
        if name not in per_round:
            continue
        plain[name], paired[name] = {}, {}
        for base in ("sdpa", "kernel", "runner"):
            if base in per_round:
                plain[name][f"over_{base}"] = medians[name] - medians[base]
                paired[name][f"over_{base}"] = statistics.median(
                    a - b for a, b in zip(per_round[name], per_round[base]))
    return plain, paired


def kernel_counts(fns: dict, provider: str) -> dict:
    """GPU activities (kernels, memsets, copies) one warm call of each function launches."""
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    for name, fn in fns.items():
        with scope(provider, name):
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
        counts[name] = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    return counts


def top_functions(fn, provider: str, device: str, n_calls: int = 500, top: int = 12) -> list[dict]:
    """cProfile of `n_calls` dispatch calls: the functions with the most own time, per call."""
    prof = cProfile.Profile()
    with scope(provider, "dispatch"):
        prof.enable()
        for _ in range(n_calls):
            fn()
        prof.disable()
    common.sync(device)
    rows = sorted(pstats.Stats(prof).stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [{"function": f"{os.path.basename(k[0])}:{k[1]}:{k[2]}", "calls_per_call": v[1] / n_calls,
             "own_us_per_call": v[2] / n_calls * 1e6, "cum_us_per_call": v[3] / n_calls * 1e6} for k, v in rows]


def refusal(provider: str, device: str, q, k, v, causal: bool) -> str | None:
    """Why `provider` cannot run this call on `device`, or None."""
    import cpattn
    from cpattn.call import make_call

    adapter = cpattn.get_provider(provider)
    if not adapter.availability().ok:
        return adapter.availability().reason or "unavailable"
    if adapter.capabilities(device) is None:
        return f"no {device} support"
    reasons = adapter.reasons(make_call(q, k, v, None, 0.0, causal, None, False))
    return "; ".join(reasons) if reasons else None


def measure_device(device: str, providers, shape, dtype: str, causal: bool, calls: int, rounds: int,
                   profile: bool, show: bool) -> dict:
    b, h, s, d = shape
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=getattr(torch, dtype)) for _ in range(3))
    result = {"shape_bhsd": list(shape), "dtype": dtype, "causal": causal, "rounds": rounds,
              ("calls_back_to_back" if device == "cpu" else "calls_timed_one_by_one"): calls,
              "cpu_threads": torch.get_num_threads(), "providers": {}}
    for provider in common.progress(providers, f"dispatch overhead ({device})", show):
        why = refusal(provider, device, q, k, v, causal)
        if why:
            result["providers"][provider] = {"skipped": why}
            continue
        try:
            fns, names = functions(provider, q, k, v, causal)
            per_round, cpu_rounds, orders = time_rounds(fns, provider, device, calls, rounds)
            plain, paired = added(per_round)
            row = {"functions": names, "us_per_call": {n: statistics.median(us) for n, us in per_round.items()},
                   "round_us": per_round, "orders": orders, "added_us": plain, "added_us_paired": paired}
            if cpu_rounds is not None:
                plain, paired = added(cpu_rounds)
                row["thread_cpu_time"] = {"us_per_call": {n: statistics.median(us) for n, us in cpu_rounds.items()},
                                          "round_us": cpu_rounds, "added_us": plain, "added_us_paired": paired}
            if device == "cuda":
                row["gpu_activities_per_call"] = kernel_counts(fns, provider)
            if profile:
                row["profile_dispatch"] = top_functions(fns["dispatch"], provider, device)
        except Exception as exc:  # record, keep going
            row = {"error": common.error_text(exc)}
        result["providers"][provider] = row
    return result


def summary_lines(device: str, result: dict) -> list[str]:
    lines = []
    for provider, row in result["providers"].items():
        if "us_per_call" not in row:
            lines.append(f"{device} {provider}: {row.get('skipped') or row.get('error')}")
            continue
        times = ", ".join(f"{n} {us:.2f}" for n, us in row["us_per_call"].items())
        extra = "; ".join(f"{n} adds {', '.join(f'{us:+.2f} {base[5:]}' for base, us in over.items())} "
                          f"(paired {', '.join(f'{us:+.2f}' for us in row['added_us_paired'][n].values())})"
                          for n, over in row["added_us"].items())
        lines.append(f"{device} {provider}: us per call: {times}; {extra}")
        if "thread_cpu_time" in row:
            cpu = row["thread_cpu_time"]
            lines.append("    thread CPU time: " + ", ".join(f"{n} {us:.2f}" for n, us in cpu["us_per_call"].items())
                         + "; dispatch adds " + ", ".join(f"{us:+.2f} {base[5:]}"
                                                          for base, us in cpu["added_us"]["dispatch"].items()))
    return lines


def plot(payload: dict, path: str) -> str | None:
    plt = common.pyplot()
    measured = {dev: r for dev, r in payload["devices"].items()
                if any("us_per_call" in row for row in r["providers"].values())}
    if plt is None or not measured:
        return None
    fig, axes = plt.subplots(1, len(measured), figsize=(6.5 * len(measured), 4.2), squeeze=False)
    for ax, (device, result) in zip(axes[0], measured.items()):
        rows = {p: row for p, row in result["providers"].items() if "us_per_call" in row}
        labels = ["sdpa", "kernel", "runner", "dispatch", "dispatch_default"]
        labels = [n for n in labels if any(n in row["us_per_call"] for row in rows.values())]
        width = 0.8 / len(labels)
        for i, name in enumerate(labels):
            xs = [j + i * width for j, row in enumerate(rows.values()) if name in row["us_per_call"]]
            ys = [row["us_per_call"][name] for row in rows.values() if name in row["us_per_call"]]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], list(rows), fontsize=8)
        b, h, s, d = result["shape_bhsd"]
        ax.set_title(f"{device}: B{b} H{h} S{s} D{d} {result['dtype']}", fontsize=9)
        ax.set_ylabel("host us per call (median over rounds)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"dispatch overhead: {payload['device']}")
    return common.save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", nargs="*", choices=("cpu", "cuda"),
                        help="default: cpu, and cuda when a GPU is present")
    parser.add_argument("--providers", nargs="*", help="default: " + "; ".join(
        f"{dev}: {' '.join(names)}" for dev, names in PROVIDERS.items()))
    parser.add_argument("--calls", type=int, default=5000, help="CPU: calls back to back per round")
    parser.add_argument("--cuda-calls", type=int, default=1000, help="CUDA: calls timed one by one per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cpu-shape", type=int, nargs=4, default=list(SHAPES["cpu"]), metavar=("B", "H", "S", "D"))
    parser.add_argument("--cuda-shape", type=int, nargs=4, default=list(SHAPES["cuda"]), metavar=("B", "H", "S", "D"))
    parser.add_argument("--causal", action="store_true", help="is_causal=True (default: no mask)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: the host cost of a call, not intra-op parallelism)")
    parser.add_argument("--profile", action="store_true", help="also record cProfile's top functions of dispatch")
    parser.add_argument("--smoke", action="store_true", help="200 calls per round, 3 rounds (unless given)")
    common.add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        defaults = {"calls": 5000, "cuda_calls": 1000, "rounds": 7}
        for key, small in (("calls", 200), ("cuda_calls", 100), ("rounds", 3)):
            if getattr(args, key) == defaults[key]:
                setattr(args, key, small)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices cuda: no GPU here")
    torch.set_num_threads(args.threads)
    label = common.device_name("cuda") if "cuda" in devices else "cpu"
    payload = {"suite": "dispatch_overhead", "device": label, "environment": common.environment(),
               "cpattn_provider_env": os.environ.get("CPATTN_PROVIDER"), "devices": {}}
    for device in devices:
        calls = args.calls if device == "cpu" else args.cuda_calls
        shape = args.cpu_shape if device == "cpu" else args.cuda_shape
        payload["devices"][device] = measure_device(device, args.providers or PROVIDERS[device], shape,
                                                    DTYPES[device], args.causal, calls, args.rounds, args.profile,
                                                    not args.quiet)
        for line in summary_lines(device, payload["devices"][device]):
            print(line, flush=True)
    path = common.write_results(common.results_path("dispatch_overhead", label, args.out, args.tag), payload)
    png = None if args.no_plot else plot(payload, path)
    print(f"wrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
