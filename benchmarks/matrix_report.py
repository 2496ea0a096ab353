"""Summarise gpu_check --cp-matrix runs: provider x schedule x world size, passed / refused / failed.

    python benchmarks/matrix_report.py OUT.md RUN.json [RUN.json ...]

Later files replace earlier ones' rows for the same (world, provider), so a re-run of some providers after a fix
stands in for their first run. Writes a markdown table and the refusal reasons, one line each.
"""

from __future__ import annotations

import collections
import json
import re
import sys


def latest_rows(paths: list[str]) -> list[dict]:
    rows: dict[tuple, list[dict]] = {}
    for path in paths:
        run = collections.defaultdict(list)
        for row in json.load(open(path))["context_parallel_gloo_one_gpu"]:
            run[(row["world"], row["provider"])].append(row)
        rows.update(run)
    return [r for group in rows.values() for r in group]


def refusal_reason(message: str) -> str:
    """The first reason of an UnsupportedInputError's message, without the numbers of the case."""
    lines = message.split("\n")
    reason = lines[1].strip(" -") if len(lines) > 1 else lines[0]
    return re.sub(r" \(here [^)]*\)", "", reason)


def verdict(row: dict) -> str:
    return "ok" if row["ok"] else "refused" if row.get("refused") else "failed"


def report(rows: list[dict], sources: list[str]) -> str:
    cells = collections.defaultdict(collections.Counter)
    for r in rows:
        cells[(r["provider"], r["schedule"], r["world"])][verdict(r)] += 1
    worlds = sorted({r["world"] for r in rows})
    keys = sorted({(r["provider"], r["schedule"]) for r in rows})
    lines = ["# Context parallelism on one GPU over gloo: every provider x schedule, against float64", "",
             "Sources: " + ", ".join(f"`{s}`" for s in sources), "",
             "Each cell: cases passed / refused / failed (forward, and backward where the provider trains here).",
             "", "| provider | schedule | " + " | ".join(f"W={w}" for w in worlds) + " |",
             "| --- | --- | " + " | ".join("---" for _ in worlds) + " |"]
    for provider, schedule in keys:
        counts = [cells.get((provider, schedule, w)) for w in worlds]
        text = [f"{c['ok']} / {c['refused']} / {c['failed']}" if c else "-" for c in counts]
        lines.append(f"| {provider} | {schedule} | " + " | ".join(text) + " |")
    total = collections.Counter(verdict(r) for r in rows)
    lines += ["", f"All: {total['ok']} passed, {total['refused']} refused, {total['failed']} failed.", "",
              "## Refusals", ""]
    reasons = collections.Counter()
    for r in rows:
        if verdict(r) == "refused":
            reasons[(r["provider"], r["schedule"], refusal_reason(r["exception"] or ""))] += 1
    lines += [f"- {p} / {s} ({n}): {why}" for (p, s, why), n in sorted(reasons.items())]
    failed = [r for r in rows if verdict(r) == "failed"]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- W={r['world']} {r['provider']} / {r['schedule']} {r['shape']} causal={r['causal']} "
                  f"mask={r['mask']}: {r['exception'] or r['errors']}" for r in failed]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out, paths = argv[0], argv[1:]
    text = report(latest_rows(paths), [p.rsplit("/", 1)[-1] for p in paths])
    with open(out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
