"""Single-device kernels: each provider through cpattn.attention_dispatch against its library called directly.

    python benchmarks/kernels.py                                   # every training provider on this device
    python benchmarks/kernels.py --providers flash _native_cudnn --seqs 2048 4096 --rounds 7
    python benchmarks/kernels.py --timing interleaved              # calls taking turns one by one
    python benchmarks/kernels.py --sections kernels auto           # and `auto` against every candidate
    python benchmarks/kernels.py --smoke                           # tiny shapes, a few rounds: does it run

kernels: per provider, head dim, sequence length (B*H*S fixed by --tokens, H=16), causal or not, forward and
  forward+backward: the call through attention_dispatch and the same kernel as its own library's users call it
  (`direct_callable`: flash_attn_func on (B, S, H, D) tensors, sageattn, a compiled flex_attention, SDPA with one
  backend forced): these direct calls are the single-device peers. Both take turns (`--timing`): do_bench runs in
  balanced rounds, or call by call. `dispatch_vs_direct` = direct time / dispatch time (1.0: dispatch costs
  nothing); `dispatch_vs_direct_paired`: the median of the same ratio within each round (or turn).
auto: per shape, `auto` (its fixed order), `auto` with autotune=True and every candidate that takes the call, all
  through attention_dispatch; what each `auto` chose, and its time over the best candidate's (`auto_vs_best`).
CUDA: bf16, timed by triton.testing.do_bench. CPU: float32, timed by torch.utils.benchmark.
FLOPs: 4*B*H*S^2*D forward (halved for causal), 3.5 times that for forward+backward.
Writes kernels_<device>.json and a PNG beside it (TFLOP/s against sequence length).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

GPU_PROVIDERS = ("flash", "_native_cudnn", "_native_flash", "_native_efficient", "flex", "sage")
CPU_PROVIDERS = ("native", "_native_flash", "_native_math")
# the providers `auto` chooses among, without those too slow to time at long sequences (flex compiles per
# shape; math holds the whole score matrix)
AUTO_CANDIDATES = {"cuda": ("flash", "_native_cudnn", "_native_flash", "_native_efficient"),
                   "cpu": ("_native_flash", "_native_math")}
DEFAULTS = {  # seqs, head dims, tokens per device type
    "cuda": ([1024, 2048, 4096, 16384, 65536], [128, 64], 16 * 16384),
    "cpu": ([256, 1024], [64], 16 * 1024),
}


def direct_callable(provider: str, q, k, v, causal: bool):
    """(function, its inputs): the provider's kernel called directly in its library's own layout; None if the
    provider has no direct counterpart here."""
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


def runs_here(name: str, device: str) -> bool:
    import cpattn

    p = cpattn.PROVIDERS[name]
    caps = p.capabilities(device) if p.availability().ok else None
    if caps is None:
        return False
    return device != "cuda" or torch.cuda.get_device_capability() >= (caps.min_compute_capability or (0, 0))


class Timer:
    """The suite's timing settings: how functions take turns and for how long."""

    def __init__(self, device: str, timing: str, rounds: int, smoke: bool):
        self.device, self.timing, self.rounds, self.smoke = device, timing, rounds, smoke
        self.cpu_seconds = 0.02 if smoke else 0.2
        self.budget_ms = 300 if smoke else 2000
        self.warmup_ms = 10 if smoke else 100

    def __call__(self, fns: dict, rounds: int | None = None) -> dict:
        """`bench_alternating` ("rounds") or `bench_interleaved` ("interleaved", with its per-call `call_ms`)."""
        if self.timing == "interleaved":
            return common.bench_interleaved(fns, self.device, warmup_ms=self.warmup_ms, budget_ms=self.budget_ms,
                                            min_calls=12)
        return common.bench_alternating(fns, self.device, rounds or self.rounds, warmup_ms=min(15, self.warmup_ms),
                                        cpu_seconds=self.cpu_seconds)


def inputs(b, h, s, d, device, dtype, backward):
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    return q, k, v, torch.randn(b, h, s, d, device=device, dtype=dtype)


def kernels_section(providers, seqs, head_dims, tokens, timer: Timer, dtype, show: bool) -> list[dict]:
    import cpattn
    from cpattn.call import make_call

    rows = []
    combos = [(p, d, s, c) for p in providers for d in head_dims for s in seqs for c in (False, True)]
    for provider, d, s, causal in common.progress(combos, "kernels", show):
        adapter = cpattn.get_provider(provider)
        h = 16
        b = max(1, tokens // (h * s))
        for backward in (False, True) if adapter.capabilities(timer.device).training else (False,):
            row = {"provider": provider, "B": b, "H": h, "S": s, "D": d, "causal": causal, "backward": backward,
                   "timing": timer.timing}
            try:
                q, k, v, dout = inputs(b, h, s, d, timer.device, dtype, backward)
                reasons = adapter.reasons(make_call(q, k, v, None, 0.0, causal, None, False))
                if reasons:
                    continue

                def via_dispatch():
                    with cpattn.attention_provider(provider):
                        out = cpattn.attention_dispatch(q, k, v, is_causal=causal)
                    if backward:
                        out.backward(dout)
                timed = {"dispatch": via_dispatch}
                direct = direct_callable(provider, q, k, v, causal)
                if direct is not None:
                    fn, direct_inputs = direct
                    dout_direct = dout if direct_inputs[0].shape == q.shape else dout.transpose(1, 2).contiguous()

                    def run_direct():
                        out = fn()
                        if backward:
                            out.backward(dout_direct)
                    timed["direct"] = run_direct
                row.update(timer(timed))
                add_ratios(row, common.flops(b, h, s, d, causal, backward))
            except Exception as exc:  # record, keep going
                row["error"] = common.error_text(exc)
            rows.append(row)
            if timer.device == "cuda":
                torch.cuda.empty_cache()
    return rows


def add_ratios(row: dict, flop: float) -> None:
    """TFLOP/s of each timed path, and direct over dispatch: from the medians and paired within rounds (or
    turns, whose per-call times are then dropped from the row)."""
    for key in ("dispatch", "direct"):
        if key in row:
            row[key]["tflops"] = flop / (row[key]["median_ms"] * 1e-3) / 1e12
    if "direct" in row:
        row["dispatch_vs_direct"] = row["direct"]["median_ms"] / row["dispatch"]["median_ms"]
        ratios = [a / b for a, b in zip(row["direct"]["round_medians_ms"], row["dispatch"]["round_medians_ms"])]
        row["round_ratios"] = ratios
        row["dispatch_vs_direct_paired"] = statistics.median(ratios)
        if row["timing"] == "interleaved":  # calls of one turn
            row["dispatch_vs_direct_paired"] = common.paired_ratio(row["direct"]["call_ms"], row["dispatch"]["call_ms"])
    for key in ("dispatch", "direct"):
        row.get(key, {}).pop("call_ms", None)


def auto_section(seqs, head_dims, tokens, timer: Timer, dtype, show: bool) -> list[dict]:
    """Per shape, `auto` (fixed order), `auto` autotuned and each candidate that takes the call, all through
    attention_dispatch; the autotuned choice is made on the first (untimed) call, as in a training loop."""
    import cpattn
    from cpattn.call import make_call
    from cpattn.providers import AUTO_TUNED

    rows = []
    auto = cpattn.get_provider("auto")
    combos = [(d, s, c, bw) for d in head_dims for s in seqs for c in (False, True) for bw in (False, True)]
    for d, s, causal, backward in common.progress(combos, "auto", show):
        h = 16
        b = max(1, tokens // (h * s))
        row = {"B": b, "H": h, "S": s, "D": d, "causal": causal, "backward": backward, "timing": timer.timing}
        try:
            q, k, v, dout = inputs(b, h, s, d, timer.device, dtype, backward)
            call = make_call(q, k, v, None, 0.0, causal, None, False)
            row["chosen"] = auto.choose(call).name

            def via(name, **options):
                def run():
                    with cpattn.attention_provider(name, **options):
                        out = cpattn.attention_dispatch(q, k, v, is_causal=causal)
                    if backward:
                        out.backward(dout)
                return run
            names = [n for n in AUTO_CANDIDATES[timer.device]
                     if runs_here(n, timer.device) and not cpattn.PROVIDERS[n].reasons(call)]
            fns = {"auto": via("auto"), "auto_tuned": via("auto", autotune=True)} | {n: via(n) for n in names}
            # at least six rounds: at S <= 4k one call can measure half again as long in one round as in the
            # next, whatever ran before it sets the clocks
            times = timer(fns, rounds=max(timer.rounds, len(fns), 2 if timer.smoke else 6))
            row["chosen_tuned"] = AUTO_TUNED.choose(call).name
            row["tuning_ms"] = AUTO_TUNED.timings(call)
            row["median_ms"] = {n: t["median_ms"] for n, t in times.items()}
            row["round_medians_ms"] = {n: t["round_medians_ms"] for n, t in times.items()}
            best = min(names, key=lambda n: row["median_ms"][n])
            row["best"], row["auto_vs_best"] = best, row["median_ms"][best] / row["median_ms"]["auto"]
            row["tuned_vs_best"] = row["median_ms"][best] / row["median_ms"]["auto_tuned"]
            if row["chosen"] in names:  # the same runner timed twice: how far apart this timing puts equal work
                row["auto_vs_chosen"] = row["median_ms"][row["chosen"]] / row["median_ms"]["auto"]
            if timer.timing == "interleaved":  # the same ratios from calls of one turn
                calls = {n: t["call_ms"] for n, t in times.items()}
                row["auto_vs_best_paired"] = common.paired_ratio(calls[best], calls["auto"])
                if row["chosen"] in names:
                    row["auto_vs_chosen_paired"] = common.paired_ratio(calls[row["chosen"]], calls["auto"])
        except Exception as exc:  # record, keep going
            row["error"] = common.error_text(exc)
        rows.append(row)
        if timer.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def summary_lines(payload: dict) -> list[str]:
    lines = []
    for r in payload.get("kernels", []):
        head = f"{r['provider']:<18} D={r['D']:<4} S={r['S']:<6} causal={r['causal']!s:<5} bwd={r['backward']!s:<5}"
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:120]}")
            continue
        ratio = f" direct/dispatch {r['dispatch_vs_direct']:.3f} (paired {r['dispatch_vs_direct_paired']:.3f})" \
            if "direct" in r else ""
        timed = r["dispatch"]
        lines.append(f"{head} dispatch {timed['median_ms']:.3f} ms {timed['tflops']:.3g} TFLOP/s{ratio}")
    for r in payload.get("auto", []):
        head = f"auto D={r['D']:<4} S={r['S']:<6} causal={r['causal']!s:<5} bwd={r['backward']!s:<5}"
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:120]}")
        else:
            lines.append(f"{head} chose {r['chosen']} (tuned {r['chosen_tuned']}), best {r['best']}: "
                         f"auto/best {r['auto_vs_best']:.3f}, tuned/best {r['tuned_vs_best']:.3f}")
    return lines


def plot(payload: dict, path: str) -> str | None:
    plt = common.pyplot()
    rows = [r for r in payload.get("kernels", []) if "dispatch" in r]
    auto = [r for r in payload.get("auto", []) if "auto_vs_best" in r]
    if plt is None or not (rows or auto):
        return None
    fig = plt.figure(figsize=(11, 8 if rows else 3.5) if not (rows and auto) else (11, 11))
    grid = fig.add_gridspec((2 if rows else 0) + (1 if auto else 0), 2)
    if rows:
        d = max(r["D"] for r in rows)
        providers = sorted({r["provider"] for r in rows})
        colours = {p: f"C{i}" for i, p in enumerate(providers)}
        for i, (causal, backward) in enumerate([(False, False), (True, False), (False, True), (True, True)]):
            ax = fig.add_subplot(grid[i // 2, i % 2])
            for provider in providers:
                sel = sorted((r for r in rows if r["provider"] == provider and r["D"] == d and r["causal"] == causal
                              and r["backward"] == backward), key=lambda r: r["S"])
                if sel:
                    ax.plot([r["S"] for r in sel], [r["dispatch"]["tflops"] for r in sel], marker="o",
                            color=colours[provider], label=common.legend_label(provider))
                    direct = [r for r in sel if "direct" in r]
                    ax.plot([r["S"] for r in direct], [r["direct"]["tflops"] for r in direct], ls="--", marker="x",
                            color=colours[provider], alpha=0.6)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{'causal' if causal else 'full'}, {'fwd+bwd' if backward else 'fwd'} (D={d}); "
                         "dashed: direct", fontsize=9)
            ax.set_ylabel("TFLOP/s")
            ax.set_xlabel("sequence length")
            ax.grid(alpha=0.3)
            if i == 0:
                ax.legend(fontsize=7)
    if auto:
        ax = fig.add_subplot(grid[-1, :])
        labels = [f"D{r['D']} S{r['S']}{' c' if r['causal'] else ''}{' b' if r['backward'] else ''}" for r in auto]
        xs = range(len(auto))
        ax.bar([x - 0.2 for x in xs], [r["auto_vs_best"] for r in auto], 0.4, label="auto / best")
        ax.bar([x + 0.2 for x in xs], [r["tuned_vs_best"] for r in auto], 0.4, label="auto tuned / best")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), labels, rotation=60, fontsize=7)
        ax.set_ylabel("best time / auto's time")
        ax.legend(fontsize=7)
    fig.suptitle(f"kernels: {payload['device']}")
    return common.save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when a GPU is present")
    parser.add_argument("--sections", nargs="*", choices=("kernels", "auto"), default=["kernels"])
    parser.add_argument("--providers", nargs="*", help="default: every training provider that runs here")
    parser.add_argument("--seqs", type=int, nargs="*", help="default: " + "; ".join(
        f"{dev} {' '.join(map(str, d[0]))}" for dev, d in DEFAULTS.items()))
    parser.add_argument("--head-dims", type=int, nargs="*")
    parser.add_argument("--tokens", type=int, help="B*H*S per case (default: cuda 16*16384, cpu 16*1024)")
    parser.add_argument("--auto-seqs", type=int, nargs="*", help="sequence lengths of the auto section "
                        "(default: cuda 2048 4096 16384, cpu the kernels' lengths)")
    parser.add_argument("--rounds", type=int, default=3, help="balanced rounds per case (--timing rounds)")
    parser.add_argument("--timing", choices=("rounds", "interleaved"), default="rounds",
                        help="do_bench runs in balanced rounds, or calls taking turns one by one")
    parser.add_argument("--smoke", action="store_true", help="S=64, D=16, 2 rounds, short timings")
    common.add_output_arguments(parser)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here")
    seqs, head_dims, tokens = DEFAULTS[device]
    if args.smoke:
        seqs, head_dims, tokens, args.rounds = [64], [16], 16 * 64, min(args.rounds, 2)
    seqs, head_dims, tokens = args.seqs or seqs, args.head_dims or head_dims, args.tokens or tokens
    auto_seqs = args.auto_seqs or ([2048, 4096, 16384] if device == "cuda" and not args.smoke else seqs)
    providers = args.providers or [p for p in (GPU_PROVIDERS if device == "cuda" else CPU_PROVIDERS)
                                   if runs_here(p, device)]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    timer = Timer(device, args.timing, args.rounds, args.smoke)
    label = common.device_name(device)
    payload = {"suite": "kernels", "device": label, "environment": common.environment(), "dtype": str(dtype)[6:],
               "timing": args.timing, "rounds": args.rounds}
    if "kernels" in args.sections:
        payload["kernels"] = kernels_section(providers, seqs, head_dims, tokens, timer, dtype, not args.quiet)
    if "auto" in args.sections:
        payload["auto"] = auto_section(auto_seqs, head_dims, tokens, timer, dtype, not args.quiet)
    for line in summary_lines(payload):
        print(line)
    path = common.write_results(common.results_path("kernels", label, args.out, args.tag), payload)
    png = None if args.no_plot else plot(payload, path)
    print(f"wrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
