"""Markdown summary and plot of benchmarks/cp_scaling.py runs: bandwidth, correctness, efficiency vs targets, peers.

    python benchmarks/cp_report.py OUT.md RUN.json [LATER_RUN.json ...]

cp_scaling.py writes the summary of its own run beside its JSON; this merges several runs.

Later runs take precedence: their check, speed and peer rows replace the earlier rows of the same case or
configuration (a check case a later run skipped keeps its earlier result). Earlier numbers that were replaced stay in their
own JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

# the scaling targets: (schedule, causal, backward, S, minimum efficiency)
TARGETS = (("ring", True, True, 32768, 0.90), ("ring", True, True, 131072, 0.95), ("ulysses", False, None, 131072, 0.97))


def _merge(runs: list[dict]) -> dict:
    merged = {"bandwidth": [], "check": {}, "speed": {}, "peers": {}, "accuracy": {}, "runs": [], "profile": []}
    for run in runs:
        sections = [k for k in ("bandwidth", "check", "speed", "peers", "profile") if run.get(k)]
        seqs = sorted({r["S"] for r in run.get("speed", []) if "S" in r})
        merged["runs"].append(f"{run['device']}, {run['backend']}, torch {run['torch']}, {run['date']}: "
                              f"{', '.join(sections)}{' at S=' + '/'.join(map(str, seqs)) if seqs else ''}; "
                              f"libraries {run['versions']}")
        merged["bandwidth"] = run.get("bandwidth") or merged["bandwidth"]
        merged["profile"] = run.get("profile") or merged["profile"]
        for c in run.get("check", []):
            key = (c["provider"], c.get("schedule"), c.get("causal"), str(c.get("shape")))
            if "skipped" not in c or key not in merged["check"]:  # a case skipped later keeps its earlier result
                merged["check"][key] = c
        for row in run.get("speed", []):
            if "schedule" in row:
                merged["speed"][(row["provider"], row["schedule"], row["S"], row["H"], row["causal"],
                                 row["backward"])] = row
        peers = run.get("peers") or {}
        merged["accuracy"].update(peers.get("accuracy", {}))
        for row in peers.get("rows", []):
            if "causal" in row:
                merged["peers"][(row["peer"], row["S"], row["H"], row["causal"], row["backward"])] = row
    return merged


def _check_lines(rows) -> list[str]:
    table: dict = {}
    for c in rows:
        if "schedule" not in c or "skipped" in c:
            key = (c["provider"], c.get("schedule", "-"))
            table.setdefault(key, {"ok": 0, "fail": 0, "refused": 0, "skipped": 0})["skipped"] += 1
            continue
        cell = table.setdefault((c["provider"], c["schedule"]), {"ok": 0, "fail": 0, "refused": 0, "skipped": 0})
        if c.get("ok"):
            cell["ok"] += 1
        elif "UnsupportedInputError" in str(c.get("error", "")):
            cell["refused"] += 1
        else:
            cell["fail"] += 1
    lines = ["| provider | schedule | ok | wrong | refused (clear error) | not run |", "| --- | --- | --- | --- | --- | --- |"]
    for (provider, schedule), cell in table.items():
        if schedule != "-" and cell["skipped"]:  # 2 shapes x causal or not per schedule; skips carry no case key
            cell["skipped"] = max(0, 4 - cell["ok"] - cell["fail"] - cell["refused"])
        lines.append(f"| {provider} | {schedule} | {cell['ok']} | {cell['fail']} | {cell['refused']} | {cell['skipped']} |")
    return lines


def _speed_lines(speed: dict) -> list[str]:
    lines = ["| provider | schedule | S | H | causal | bwd | one GPU ms | per rank ms | efficiency | peak extra GiB per rank (one GPU) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in speed.values():
        if "efficiency" not in r:
            lines.append(f"| {r['provider']} | {r['schedule']} | {r['S']} | {r['H']} | {r['causal']} | {r['backward']} | "
                         f"error: {str(r.get('error'))[:60]} | | | |")
            continue
        lines.append(f"| {r['provider']} | {r['schedule']} | {r['S']} | {r['H']} | {r['causal']} | {r['backward']} | "
                     f"{r['one_gpu']['median_ms']:.2f} | {r['per_rank']['median_ms']:.2f} | {r['efficiency']:.3f} | "
                     f"{r['per_rank']['peak_extra_gib']:.2f} ({r['one_gpu']['peak_extra_gib']:.2f}) |")
    return lines


def _target_lines(speed: dict) -> list[str]:
    lines = ["| target | provider | measured (each H, fwd and fwd+bwd where the target does not fix it) | met |",
             "| --- | --- | --- | --- |"]
    for schedule, causal, backward, s, need in TARGETS:
        for provider in sorted({k[0] for k in speed}):
            sel = [r for k, r in speed.items() if k[0] == provider and k[1] == schedule and k[2] == s
                   and k[4] == causal and (backward is None or k[5] == backward) and "efficiency" in r]
            if not sel:
                continue
            values = ", ".join(f"H{r['H']} {'fwd+bwd' if r['backward'] else 'fwd'} {r['efficiency']:.3f}" for r in sel)
            met = all(r["efficiency"] >= need for r in sel)
            what = f"{schedule} {'zigzag causal' if causal else 'full'} {'fwd+bwd ' if backward else ''}>= {need:.0%} at S={s // 1024}k"
            lines.append(f"| {what} | {provider} | {values} | {'yes' if met else 'no'} |")
    return lines


def _peer_lines(merged: dict) -> list[str]:
    speed = merged["speed"]
    lines = ["| peer | S | H | causal | bwd | peer ms | cpattn ms (same kernel, cuDNN) | cpattn / peer time | peer GiB | cpattn GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (peer, s, h, causal, backward), row in merged["peers"].items():
        schedule = "ulysses" if peer.endswith("ulysses") else "ring"
        mine = speed.get(("_native_cudnn", schedule, s, h, causal, backward))
        if not row.get("per_rank") or not mine or not mine.get("per_rank"):
            lines.append(f"| {peer} | {s} | {h} | {causal} | {backward} | error: {str(row.get('error'))[:60]} | | | | |")
            continue
        p, c = row["per_rank"], mine["per_rank"]
        lines.append(f"| {peer} | {s} | {h} | {causal} | {backward} | {p['median_ms']:.2f} | {c['median_ms']:.2f} "
                     f"({schedule}) | {c['median_ms'] / p['median_ms']:.3f} | {p['peak_extra_gib']:.2f} | "
                     f"{c['peak_extra_gib']:.2f} |")
    return lines


def _profile_lines(rows) -> list[str]:
    lines = ["| provider | schedule | S | H | causal | bwd | rank | wall ms | compute kernels ms | NCCL kernels ms | "
             "compute stream idle ms | largest idle gaps (us, before which kernel) | one GPU kernels ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        for rank, r in enumerate(row.get("ranks") or []):
            gaps = "; ".join(f"{g['us']:.0f} ({g['before'][:28]})" for g in r.get("largest_gaps", [])[:3])
            lines.append(f"| {row['provider']} | {row['schedule']} | {row['S']} | {row['H']} | {row['causal']} | "
                         f"{row['backward']} | {rank} | {r['wall_ms']:.2f} | {r['compute_kernel_ms']:.2f} | "
                         f"{r['nccl_kernel_ms']:.2f} | {r.get('gpu_idle_ms', 0):.2f} | {gaps} | "
                         f"{row['one_gpu']['compute_kernel_ms']:.2f} |")
    return lines


def write(out_md: str, paths: list[str]) -> str:
    runs = [json.load(open(p)) for p in paths]
    merged = _merge(runs)
    lines = ["# Context parallelism across GPUs (NCCL)", "",
             "Runs, oldest first; each row below comes from the latest run that measured it (the earlier numbers "
             "stay in their JSON files):", ""] + [f"- {r}" for r in merged["runs"]] + ["",
        "Efficiency = one-GPU time / (W x per-rank time), bf16, D=128, B=1; per-rank time is the slowest rank's, "
        "median over iterations. Memory is the peak allocated during the timed calls above the inputs.", "",
        "## Targets", ""] + _target_lines(merged["speed"])
    if merged["bandwidth"]:
        lines += ["", "## NCCL bandwidth per rank", "", "| op | MiB | GB/s |", "| --- | --- | --- |"]
        lines += [f"| {b['op']} | {b['bytes'] // 2**20} | {b['GB_per_s']:.1f} |" for b in merged["bandwidth"]]
    lines += ["", "## Correctness: CP over NCCL vs the same provider on one GPU and vs float64", "",
              "Forward and backward; a case is ok when CP's error against float64 is within the one-GPU error plus "
              "the dtype's tolerance, for the output and every gradient.", ""] + _check_lines(merged["check"].values())
    lines += ["", "## Scaling", ""] + _speed_lines(merged["speed"])
    if merged["profile"]:
        lines += ["", "## Where the time goes (torch profiler, one call after warm-up)", "",
                  "The profiler itself slows the host (wall times here exceed the timed ones); kernel times and "
                  "the gaps between kernels on the compute stream are what to read.", ""]
        lines += _profile_lines(merged["profile"])
    if merged["peers"]:
        lines += ["", "## Peers", "", f"Accuracy (max abs difference from cuDNN on one GPU): {merged['accuracy']}", ""]
        lines += _peer_lines(merged)
    with open(out_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    return out_md


def plot(result: dict, json_path: str) -> str | None:
    """Efficiency against total length per provider and schedule, one panel per (mask, direction)."""
    plt = common.pyplot()
    rows = [r for r in result.get("speed", []) if "efficiency" in r]
    if plt is None or not rows:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True, sharey=True)
    for ax, (causal, backward) in zip(axes.flat, [(True, False), (True, True), (False, False), (False, True)]):
        for key in sorted({(r["provider"], r["schedule"], r["H"]) for r in rows}):
            sel = sorted((r for r in rows if (r["provider"], r["schedule"], r["H"]) == key
                          and r["causal"] == causal and r["backward"] == backward), key=lambda r: r["S"])
            if sel:
                ax.plot([r["S"] for r in sel], [r["efficiency"] for r in sel], marker="o",
                        label=common.legend_label(f"{key[0]} {key[1]} H={key[2]}"))
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(f"{'zigzag causal' if causal else 'full'}, {'fwd+bwd' if backward else 'fwd'}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("one-GPU time / (W x per-rank time)")
    for ax in axes[1]:
        ax.set_xlabel("total sequence length")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"context parallel scaling: {result['device']}")
    return common.save_figure(fig, json_path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_md", help="the markdown file to write")
    parser.add_argument("runs", nargs="+", help="cp_scaling JSON files, oldest first")
    parser.add_argument("--plot", action="store_true", help="also a PNG of the latest run, beside OUT_MD")
    args = parser.parse_args(argv)
    print(write(args.out_md, args.runs))
    if args.plot:
        with open(args.runs[-1]) as f:
            print(plot(json.load(f), args.out_md))


if __name__ == "__main__":
    main()
