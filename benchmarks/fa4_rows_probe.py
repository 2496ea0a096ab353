"""FA4's ring backward with one dQ accumulator per rank (cpattn/providers/fa4_rows.py) against one whole
backward per ring step, on one GPU.

    python benchmarks/fa4_rows_probe.py [--seqs 65536] [--parts 2 4] [--out DIR] [--tag TAG]

Per case: all P ranks' ring forward+backward one after another with no communication (the ring split of
benchmarks/run.py: zigzag, causal unless --causal says otherwise, H=16, D=128, bf16), with the shared accumulator ("shared") and with the
provider's per-step backward ("per_step", the generation's row_backward_kernels patched to None for the
probe), timed in balanced alternating rounds with one whole-sequence call; `efficiency` = whole / split. And each
rank's dQ from both ways against the whole call's dQ at that rank's rows, and the peak memory each way allocates
above the inputs while all ranks' steps run (dK/dV parts travel between ranks,
which this one-process split does not do; the gloo checks in benchmarks/gpu_check.py cover them). Writes
fa4_rows_probe<tag>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cpattn  # noqa: E402
from benchmarks.run import RESULTS, bench_alternating, ring_split_case, write_cases  # noqa: E402


def per_step(adapter):
    """The provider's per-step ring backward: no kernels for a shared accumulator."""
    return mock.patch.object(adapter.generation(), "row_backward_kernels", lambda: None)


def case(s: int, p: int, causal: bool):
    """(adapter, whole, split, shards): benchmarks/run.py's ring split of `flash` with backward (`whole` and
    `split` return dQ: the whole call's, and each rank's) and each rank's global positions."""
    whole, split = ring_split_case("flash", s, p, True, causal)
    shards = [cpattn.cp.layout.ring_positions(s, p, r, "zigzag", "cuda") for r in range(p)]
    return cpattn.PROVIDERS["flash"], whole, split, shards


def run_case(s: int, p: int, causal: bool) -> dict:
    adapter, whole, split_dq, shards = case(s, p, causal)
    reference = whole()
    row = {"provider": "flash", "S": s, "P": p, "causal": causal, "H": 16, "D": 128, "layout": "zigzag"}
    for name, patch in (("shared", contextlib.nullcontext), ("per_step", lambda: per_step(adapter))):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with patch():
            dqs = split_dq()
        torch.cuda.synchronize()
        row[f"{name}_peak_mib_above_inputs"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
        row[f"{name}_dq_max_error"] = max((dq.float() - reference.index_select(2, i).float()).abs().max().item()
                                         for dq, i in zip(dqs, shards))
    row["dq_scale"] = reference.float().abs().max().item()

    def timed(patch):
        def run():
            with patch():
                split_dq()
        return run
    times = bench_alternating({"whole": whole, "shared": timed(contextlib.nullcontext),
                               "per_step": timed(lambda: per_step(adapter))}, rounds=6)
    row["times"] = times
    for name in ("shared", "per_step"):
        row[f"{name}_efficiency"] = times["whole"]["median_ms"] / times[name]["median_ms"]
        row[f"{name}_round_efficiencies"] = [w / x for w, x in zip(times["whole"]["round_medians_ms"],
                                                                   times[name]["round_medians_ms"])]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="*", default=[65536])
    parser.add_argument("--parts", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--causal", choices=("causal", "noncausal", "both"), default="causal")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    rows = []
    causal_options = {"causal": [True], "noncausal": [False], "both": [True, False]}[args.causal]
    for causal, s, p in itertools.product(causal_options, args.seqs, args.parts):
        row = run_case(s, p, causal)
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "times"}, flush=True)
        torch.cuda.empty_cache()
    print("wrote", write_cases(args.out, f"fa4_rows_probe{args.tag}", rows))


if __name__ == "__main__":
    main()
