"""bf16 error of context-parallel attention against the float64 reference as the world size grows (CPU, gloo).

    python benchmarks/cp_error_vs_world.py [--worlds 1 2 4 8]

Same problem at every world size (B=1, H=8, Hkv=4, S=512, D=64, causal, zigzag), ring / Ulysses / all-gather
with `native`, forward and backward. Writes benchmarks/results/cp_error_vs_world_cpu.json. The merge keeps
out and lse in float32 across steps and casts once at the end, so the error should not grow with W.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from cp_harness import Case, run_cases  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cp_error_vs_world_cpu.json"))
    args = parser.parse_args()
    rows = []
    for world in args.worlds:
        cases = [Case(strategy=s, dtype="bfloat16", batch=1, q_heads=8, kv_heads=4, seq=512, head_dim=64)
                 for s in ("ring", "ulysses", "allgather")]
        outcomes = run_cases(world, cases, timeout=600)
        for case in cases:
            o = outcomes[case.name]
            rows.append({"world": world, "schedule": case.strategy, "errors": o.errors, "exception": o.exception})
            print(world, case.strategy, {k: f"{v:.2e}" for k, v in o.errors.items()}, o.exception or "", flush=True)
    with open(args.out, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d %H:%M"), "device": "cpu (gloo)", "dtype": "bfloat16",
                   "shape": "B1 H8 Hkv4 S512 D64 causal zigzag", "rows": rows}, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
