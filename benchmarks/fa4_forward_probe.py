"""The ring split with FlashAttention-4's forward launched directly (cpattn/providers/fa4_forward.py) and through
the library's `_flash_attn_fwd`, against one whole call. One GPU, no communication.

    python benchmarks/fa4_forward_probe.py [--cases 16384:4:fwd 16384:4 16384:8 65536:4] [--out DIR] [--tag TAG]

Each case S:P[:fwd] is benchmarks/run.py's ring split (zigzag causal, H=16, D=128, bf16; forward+backward unless
`:fwd`): every rank's block kernels and merges one after another. The two ways and one whole-sequence call are
timed in balanced alternating rounds; for each way also the host time to issue the split (the GPU drained first)
and its dQ (or output) against the whole call's. Writes fa4_forward_probe<tag>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cpattn  # noqa: E402
from benchmarks.run import RESULTS, bench_alternating, host_ms, ring_split_case, write_cases  # noqa: E402


@contextlib.contextmanager
def library_forward():
    """FA4's forward through `_flash_attn_fwd` while inside (the direct launch switched off)."""
    gen = cpattn.PROVIDERS["flash"].generation()
    direct, gen._direct_forward = gen._direct_forward, None
    try:
        yield
    finally:
        gen._direct_forward = direct


def case(s: int, p: int, backward: bool, rounds: int) -> dict:
    torch.manual_seed(0)
    whole, split = ring_split_case("flash", s, p, backward)

    def split_library():
        with library_forward():
            return split()
    row = {"S": s, "P": p, "backward": backward, "causal": True, "layout": "zigzag", "H": 16, "D": 128}
    reference = whole()
    for name, fn in (("direct", split), ("library", split_library)):
        parts = fn()
        # each rank's rows of the whole call's result, in zigzag order
        shards = [cpattn.cp.layout.ring_positions(s, p, r, "zigzag", reference.device) for r in range(p)]
        row[f"{name}_max_error"] = max((x.float() - reference.index_select(2, i).float()).abs().max().item()
                                       for x, i in zip(parts, shards))
        row[f"{name}_host_ms"] = host_ms(fn, repeats=9)
    times = bench_alternating({"whole": whole, "direct": split, "library": split_library}, rounds=rounds)
    row["times"] = times
    row["efficiency"] = {k: times["whole"]["median_ms"] / times[k]["median_ms"] for k in ("direct", "library")}
    row["round_efficiencies"] = {k: [w / x for w, x in zip(times["whole"]["round_medians_ms"],
                                                           times[k]["round_medians_ms"])]
                                 for k in ("direct", "library")}
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=["16384:4:fwd", "16384:4", "16384:8", "65536:4"])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    rows = []
    for spec in args.cases:
        s, p, *mode = spec.split(":")
        row = case(int(s), int(p), backward=mode != ["fwd"], rounds=args.rounds)
        rows.append(row)
        print(spec, {k: round(v, 3) for k, v in row["efficiency"].items()},
              {k: round(row[f"{k}_host_ms"], 2) for k in ("direct", "library")},
              {k: row[f"{k}_max_error"] for k in ("direct", "library")}, flush=True)
        torch.cuda.empty_cache()
    print("wrote", write_cases(args.out, f"fa4_forward_probe{args.tag}", rows))


if __name__ == "__main__":
    main()
