"""Markdown summary and PNG plots from a benchmarks/run.py JSON file, with every target's measured value.

    python -m benchmarks.report benchmarks/results/bench_gpu_<device>.json
"""

from __future__ import annotations

import json
import os
import sys

TARGETS = {
    "dispatch_ratio_4k": "through attention_dispatch >= 99% of the direct kernel, S >= 4k (fwd and fwd+bwd)",
    "dispatch_ratio_2k": "through attention_dispatch >= 95% of the direct kernel at S = 2k",
    "host_overhead": "host overhead added by dispatch <= 5 us per call (p50), zero extra kernels",
    "ring_split": "ring split efficiency at P=4, S=64k >= 97% of one kernel, forward+backward",
    "auto": "provider 'auto' within 2% of the best provider measured per shape (through attention_dispatch)",
    "auto_tuned": "provider 'auto' with autotune=True within 2% of the best provider measured per shape",
}


def auto_vs_best(kernels) -> list[dict]:
    """Per shape measured with 'auto' and at least one other provider: auto's time over the best provider's."""
    rows = []
    key = lambda r: (r["D"], r["S"], r["causal"], r["backward"])  # noqa: E731
    timed = [r for r in kernels if "dispatch" in r]
    for r in (r for r in timed if r["provider"] == "auto"):
        others = [o for o in timed if o["provider"] != "auto" and key(o) == key(r)]
        if others:
            best = min(others, key=lambda o: o["dispatch"]["median_ms"])
            rows.append({"D": r["D"], "S": r["S"], "causal": r["causal"], "backward": r["backward"],
                         "best": best["provider"], "auto_vs_best": best["dispatch"]["median_ms"] / r["dispatch"]["median_ms"]})
    return rows


def _kernel_lines(rows) -> list[str]:
    # per round: direct/dispatch of each alternating round (their median is the paired ratio)
    lines = ["| provider | D | S | causal | bwd | direct TFLOP/s | dispatch TFLOP/s | dispatch/direct | per round |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['provider']} | {r['D']} | {r['S']} | {r['causal']} | {r['backward']} | error: "
                         f"{r['error'][:80]} | | | |")
            continue
        direct = f"{r['direct']['tflops']:.0f}" if "direct" in r else "-"
        ratio = f"{r['dispatch_vs_direct']:.3f}" if "dispatch_vs_direct" in r else "-"
        rounds = ", ".join(f"{x:.3f}" for x in r.get("round_ratios", []))
        lines.append(f"| {r['provider']} | {r['D']} | {r['S']} | {r['causal']} | {r['backward']} | {direct} | "
                     f"{r['dispatch']['tflops']:.0f} | {ratio} | {rounds} |")
    return lines


def _auto_lines(rows) -> list[str]:
    tuned = any("tuned_vs_best" in r for r in rows)
    cols = ["D", "S", "causal", "bwd", "chosen", "best", "auto / best"]
    cols += ["chosen tuned", "tuned / best"] if tuned else []
    lines = ["| " + " | ".join(cols + ["medians ms"]) + " |", "|" + " --- |" * (len(cols) + 1)]
    for r in rows:
        head = f"| {r['D']} | {r['S']} | {r['causal']} | {r['backward']} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error'][:80]} |" + " |" * (len(cols) - 4))
            continue
        times = ", ".join(f"{n} {t:.3f}" for n, t in r["median_ms"].items())
        cells = [r["chosen"], r["best"], f"{r['auto_vs_best']:.3f}"]
        if tuned:
            cells += [r.get("chosen_tuned", "-"), f"{r['tuned_vs_best']:.3f}" if "tuned_vs_best" in r else "-"]
        lines.append(f"{head} " + " | ".join(cells) + f" | {times} |")
    return lines


def _targets(result) -> list[str]:
    lines = ["| target | measured | met |", "| --- | --- | --- |"]
    kernels = [r for r in result.get("kernels", []) if "dispatch_vs_direct" in r]
    for key, lo, hi, need in (("dispatch_ratio_4k", 4096, 10**9, 0.99), ("dispatch_ratio_2k", 2048, 2048, 0.95)):
        sel = [r for r in kernels if lo <= r["S"] <= hi]
        if sel:
            worst = min(r["dispatch_vs_direct"] for r in sel)
            paired = [r["dispatch_vs_direct_paired"] for r in sel if "dispatch_vs_direct_paired" in r]
            unit = "turn" if sel[0].get("timing") == "interleaved" else "round"
            extra = (f"; median of per-{unit} ratios: worst {min(paired):.3f}, {sum(p >= need for p in paired)}/"
                     f"{len(paired)} at or above {need}" if paired else "")
            lines.append(f"| {TARGETS[key]} | worst {worst:.3f} over {len(sel)} configs{extra} | "
                         f"{'yes' if worst >= need else 'no'} |")
    for o in result.get("overhead", []):
        extra, counts = "", [c for c in (o.get("kernels"), o.get("kernels_fwd_bwd")) if c]
        if o.get("kernels"):
            extra = f", kernels direct {o['kernels']['direct']} vs dispatch {o['kernels']['dispatch']}"
        if o.get("kernels_fwd_bwd"):
            extra += (f"; forward+backward {o['kernels_fwd_bwd']['direct']} vs "
                      f"{o['kernels_fwd_bwd']['dispatch']}")
        met = o["overhead_us_p50"] <= 5 and all(c["direct"] == c["dispatch"] for c in counts)
        lines.append(f"| {TARGETS['host_overhead']} ({o['device']}, {o['provider']}) | "
                     f"{o['overhead_us_p50']:.1f} us (direct {o['direct_us_p50']:.1f}, dispatch "
                     f"{o['dispatch_us_p50']:.1f}){extra} | {'yes' if met else 'no'} |")
    auto = [r for r in result.get("auto", []) if "auto_vs_best" in r] or auto_vs_best(result.get("kernels", []))
    if auto:
        worst = min(auto, key=lambda r: r["auto_vs_best"])
        within = sum(r["auto_vs_best"] >= 0.98 for r in auto)
        same = [r["auto_vs_chosen"] for r in auto if "auto_vs_chosen" in r]
        spread = (f"; auto against the provider it ran (the same kernel timed twice): {min(same):.3f} to "
                  f"{max(same):.3f}" if same else "")
        paired = [r["auto_vs_best_paired"] for r in auto if "auto_vs_best_paired" in r]
        if paired:  # interleaved timing: ratios of calls of one turn
            same_paired = [r["auto_vs_chosen_paired"] for r in auto if "auto_vs_chosen_paired" in r]
            spread += (f"; median of per-turn ratios: worst {min(paired):.3f}, "
                       f"{sum(p >= 0.98 for p in paired)}/{len(paired)} within 2%")
            spread += (f", auto against the provider it ran {min(same_paired):.3f} to {max(same_paired):.3f}"
                       if same_paired else "")
        lines.append(f"| {TARGETS['auto']} | worst {worst['auto_vs_best']:.3f} over {len(auto)} shapes (best there: "
                     f"{worst['best']}, D={worst['D']} S={worst['S']} causal={worst['causal']} "
                     f"bwd={worst['backward']}), {within}/{len(auto)} within 2%{spread} | "
                     f"{'yes' if worst['auto_vs_best'] >= 0.98 else 'no'} |")
    tuned = [r for r in result.get("auto", []) if "tuned_vs_best" in r]
    if tuned:
        worst = min(tuned, key=lambda r: r["tuned_vs_best"])
        lines.append(f"| {TARGETS['auto_tuned']} | worst {worst['tuned_vs_best']:.3f} over {len(tuned)} shapes (chose "
                     f"{worst['chosen_tuned']}, best there: {worst['best']}, D={worst['D']} S={worst['S']} "
                     f"causal={worst['causal']} bwd={worst['backward']}) | "
                     f"{'yes' if worst['tuned_vs_best'] >= 0.98 else 'no'} |")
    split = [r for r in result.get("ring_split", []) if r.get("P") == 4 and r.get("S") == 65536 and r.get("backward")]
    for r in split:
        if "efficiency" in r:
            mask = "zigzag causal" if r.get("causal", True) else "no mask"
            lines.append(f"| {TARGETS['ring_split']} ({r['provider']}, {mask}) | {r['efficiency']:.3f} | "
                         f"{'yes' if r['efficiency'] >= 0.97 else 'no'} |")
    return lines


def _split_lines(rows) -> list[str]:
    # host ms: time to issue the split's work; when it is near split ms, the host, not the GPU, sets the pace.
    # per round: whole/split of each alternating round (when the suite timed rounds), to show the spread
    lines = ["| provider | causal | S | P | bwd | whole ms | split ms | host ms | efficiency | per round |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        head = f"| {r['provider']} | {r.get('causal', True)} | {r['S']} | {r['P']} | {r['backward']} |"
        if "efficiency" in r:
            host = f"{r['split_host_ms']:.2f}" if "split_host_ms" in r else ""
            rounds = ", ".join(f"{e:.3f}" for e in r.get("round_efficiencies", []))
            lines.append(f"{head} {r['whole']['median_ms']:.2f} | {r['split']['median_ms']:.2f} | {host} | "
                         f"{r['efficiency']:.3f} | {rounds} |")
        else:
            lines.append(f"{head} error: {r.get('error', '')[:80]} | | | | |")
    return lines


def _plot(result, png: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result.get("kernels", []) if "dispatch" in r and r["D"] == 128]
    if not rows:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for ax, (causal, backward) in zip(axes.flat, [(False, False), (True, False), (False, True), (True, True)]):
        for provider in sorted({r["provider"] for r in rows}):
            sel = sorted((r for r in rows if r["provider"] == provider and r["causal"] == causal
                          and r["backward"] == backward), key=lambda r: r["S"])
            if sel:
                ax.plot([r["S"] for r in sel], [r["dispatch"]["tflops"] for r in sel], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{'causal' if causal else 'full'}, {'fwd+bwd' if backward else 'fwd'} (D=128, bf16)")
        ax.set_ylabel("TFLOP/s through attention_dispatch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("sequence length")
    fig.suptitle(result["environment"].get("gpu", "cpu"))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return True


def write_report(path: str) -> str:
    with open(path) as f:
        result = json.load(f)
    env = result["environment"]
    lines = [f"# Benchmark summary: {env.get('gpu', 'cpu')}", "",
             f"torch {env['torch']}, CUDA {env.get('cuda (torch build)')}, {env['date']}; providers: "
             + ", ".join(f"{k} ({v})" for k, v in env.get("providers", {}).items()), "", "## Targets", ""]
    lines += _targets(result)
    if result.get("kernels"):
        lines += ["", "## Kernels (bf16, H=16, B*H*S fixed)", ""] + _kernel_lines(result["kernels"])
    if result.get("auto"):
        lines += ["", "## auto vs every provider it chooses among (through attention_dispatch, alternating rounds)", ""]
        lines += _auto_lines(result["auto"])
    if result.get("ring_split"):
        lines += ["", "## Ring split efficiency on one GPU (zigzag layout; all P ranks' work, no communication)", ""]
        lines += _split_lines(result["ring_split"])
    if result.get("memory"):
        lines += ["", "## Peak memory per rank (native provider, causal, fwd+bwd)", "",
                  "| schedule | world | total S | peak MB per rank |", "| --- | --- | --- | --- |"]
        for r in result["memory"]:
            peaks = ", ".join(f"{x:.0f}" for x in r["peak_mb_per_rank"] if x is not None) or "n/a on CPU"
            lines.append(f"| {r['schedule']} | {r['world']} | {r['total_seq']} | {peaks} |")
    png = path.replace(".json", ".png")
    if _plot(result, png):
        lines += ["", f"![kernels]({os.path.basename(png)})"]
    md = path.replace(".json", ".md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    return md


if __name__ == "__main__":
    print(write_report(sys.argv[1]))
