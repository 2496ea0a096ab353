"""Summarise gpu_check --cp-matrix runs: provider x schedule x world size, passed / refused / failed.

    python tests/gpu/matrix_report.py OUT.md RUN.json [RUN.json ...]

A case run again in a later file (same world, provider, schedule, shape, causal, mask, dtype, backward) keeps
only its later result, so a re-run after a fix stands in for the first run; cases new in a later file are added. Writes a markdown table and the refusal reasons, one line each.
"""

from __future__ import annotations

import collections
import json
import re
import sys


CASE_FIELDS = ("world", "provider", "schedule", "shape", "causal", "mask", "dtype", "backward")


def latest_rows(paths: list[str]) -> list[dict]:
    """Every case of every run; a case run again (same fields) keeps its latest result only."""
    rows: dict[tuple, dict] = {}
    for path in paths:
        for row in json.load(open(path))["context_parallel_gloo_one_gpu"]:
            rows[tuple(str(row.get(f)) for f in CASE_FIELDS)] = row
    return list(rows.values())


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
