"""How much of the ring split's loss is each block kernel's last, partly filled wave, and would running a
rank's steps on CUDA streams in turn (the next kernel starting on the SMs the current one's tail leaves idle)
recover it? One GPU, no communication.

    python benchmarks/step_streams_probe.py [--seq 65536] [--parts 4] [--provider flash] [--out DIR] [--tag TAG]
    python benchmarks/step_streams_probe.py --ring [--ring-parts 2 4 8] [--noncausal] ...

Kernels (the default): builds every rank's ring blocks for zigzag causal attention (benchmarks/run.py's ring
split: H=16, D=128, bf16) and times, in balanced alternating rounds: one whole-sequence forward and backward
kernel; all ranks' block forwards (with their merge) and block backwards (per block, given the global out and
LSE) on one stream; and the same on 2 and 3 streams taken in turn, each rank's steps joining the home stream
before its merge. Writes step_streams_probe<tag>.json.

--reserved N: memory the caching allocator reserves after N ring splits in a row (N layers' backwards) at
S=16k, P=4, with the backward's two streams the same at every call (as cpattn/cp/streams.py keeps them) and with
two new streams from PyTorch's pool at every call. Writes step_streams_reserved<tag>.json.

--ring: the ring itself (benchmarks/run.py's ring split, forward+backward, the provider's ring backward) with its
backward's steps on one stream and on two (cpattn/cp/streams.py), against one whole call in balanced alternating
rounds; each way's dQ against the whole call's, the peak memory each allocates above the inputs while all
ranks' steps run, and the host time each takes to issue them. Writes step_streams_ring<tag>.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cpattn  # noqa: E402
from benchmarks.run import RESULTS, bench_alternating, host_ms, ring_split_case, write_cases  # noqa: E402
from cpattn.cp.comm import CommStats  # noqa: E402
from cpattn.cp.layout import ring_positions  # noqa: E402
from cpattn.cp.mesh import Group  # noqa: E402
from cpattn.cp.ring import RingSpec, block_plan  # noqa: E402
from cpattn.dispatch import make_call  # noqa: E402
from cpattn.ops.merge import PartialAttention  # noqa: E402


def blocks_of(provider, s: int, p: int, h: int = 16, d: int = 128):
    """Per rank: [(rows, call, dout, out, lse)] of its ring steps, and the whole-sequence call and tensors."""
    q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    full = make_call(q, k, v, None, 0.0, True, None, False)
    out, lse = provider.forward(full)
    shards = [ring_positions(s, p, r, "zigzag", "cuda") for r in range(p)]
    local = [[x.index_select(2, i).contiguous() for x in (q, k, v, dout, out, lse)] for i in shards]
    ranks = []
    for r in range(p):
        spec = RingSpec(Group(None, r, p, "loopback"), "zigzag", s, 60.0, CommStats())
        lq, _, _, ldo, lo, ll = local[r]
        steps = []
        for step in range(p):
            src = (r - step) % p
            plan = block_plan(spec, r, src, True)
            if plan is None:
                continue
            _, sk, sv, *_ = local[src]
            rows = [x[:, :, plan.rows].contiguous() for x in (lq, ldo, lo, ll)]
            call = make_call(rows[0], sk[:, :, plan.cols].contiguous(), sv[:, :, plan.cols].contiguous(), None,
                             0.0, plan.causal, None, False)
            steps.append((plan.rows, call, rows[1], rows[2], rows[3]))
        ranks.append((lq.shape[2], steps))
    return ranks, (full, dout, out, lse)


def run_steps(fn, steps, n_streams: int):
    """fn(step) for each step, on `n_streams` side streams in turn (1: the current stream); every result is
    recorded for the home stream, which waits for all of them at the end."""
    if n_streams == 1:
        return [fn(step) for step in steps]
    home = torch.cuda.current_stream()
    streams = [torch.cuda.Stream() for _ in range(n_streams)]
    results = []
    for i, step in enumerate(steps):
        side = streams[i % n_streams]
        side.wait_stream(home)
        with torch.cuda.stream(side):
            result = fn(step)
        for t in result:
            t.record_stream(home)
        results.append(result)
    for side in streams:
        home.wait_stream(side)
    return results


def forward_split(provider, ranks, n_streams: int):
    def one(step):
        return provider.forward(step[1])

    def run():
        outs = []
        for q_len, steps in ranks:
            acc = PartialAttention(1, steps[0][1].q_heads, q_len, steps[0][1].value_dim, torch.device("cuda"))
            for (rows, *_), (o, lse) in zip(steps, run_steps(one, steps, n_streams)):
                acc.add_rows(rows, o, lse)
            outs.append(acc.result(torch.bfloat16)[0])
        return outs
    return run


def backward_split(provider, ranks, n_streams: int):
    def one(step):
        _, call, dout, out, lse = step
        return provider.backward(call, dout, out, lse)

    def run():
        return [run_steps(one, steps, n_streams) for _, steps in ranks]
    return run


def ring_case(provider: str, s: int, p: int, causal: bool, rounds: int) -> dict:
    """The ring split with its backward on one stream and on two, against one whole call (see the docstring)."""
    torch.manual_seed(0)  # both cases draw the same inputs: the whole call checks both
    whole, split_1 = ring_split_case(provider, s, p, True, causal, step_streams=1)
    torch.manual_seed(0)
    _, split_2 = ring_split_case(provider, s, p, True, causal, step_streams=2)
    shards = [ring_positions(s, p, r, "zigzag", "cuda") for r in range(p)]
    reference = whole()
    row = {"provider": provider, "S": s, "P": p, "causal": causal, "layout": "zigzag", "H": 16, "D": 128}
    for name, split in (("streams_1", split_1), ("streams_2", split_2)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        dqs = split()
        torch.cuda.synchronize()
        row[f"{name}_peak_mib_above_inputs"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
        row[f"{name}_dq_max_error"] = max((dq.float() - reference.index_select(2, i).float()).abs().max().item()
                                         for dq, i in zip(dqs, shards))
    for name, split in (("streams_1", split_1), ("streams_2", split_2)):
        row[f"{name}_host_ms"] = host_ms(split, repeats=9)  # time to issue all ranks' work (GPU drained first)
    times = bench_alternating({"whole": whole, "streams_1": split_1, "streams_2": split_2}, rounds=rounds)
    row["times"] = times
    row["efficiency"] = {k: times["whole"]["median_ms"] / t["median_ms"] for k, t in times.items() if k != "whole"}
    row["round_efficiencies"] = {k: [w / x for w, x in zip(times["whole"]["round_medians_ms"], t["round_medians_ms"])]
                                 for k, t in times.items() if k != "whole"}
    return row


def reserved_case(calls: int, s: int = 16384, p: int = 4) -> dict:
    """Reserved memory after `calls` ring splits with the same streams each time and with new ones each time."""
    from unittest import mock

    from cpattn.cp import streams

    row = {"provider": "flash", "S": s, "P": p, "calls": calls, "causal": True}
    for name in ("same_streams", "new_streams_per_call"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        _, split = ring_split_case("flash", s, p, True, True, step_streams=2)
        split()
        torch.cuda.synchronize()
        first = torch.cuda.memory_reserved()
        fresh = streams._streams_of.__wrapped__ if name == "new_streams_per_call" else streams._streams_of
        with mock.patch.object(streams, "_streams_of", fresh):
            for _ in range(calls):
                split()
        torch.cuda.synchronize()
        row[f"{name}_reserved_mib_after_first"] = first / 2 ** 20
        row[f"{name}_reserved_mib_after_all"] = torch.cuda.memory_reserved() / 2 ** 20
        del split
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--provider", default="flash")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default="")
    parser.add_argument("--ring", action="store_true", help="time the ring split with 1 and 2 backward streams")
    parser.add_argument("--ring-parts", type=int, nargs="+", default=[4])
    parser.add_argument("--ring-providers", nargs="+", default=["flash"])
    parser.add_argument("--noncausal", action="store_true", help="with --ring: also without causality")
    parser.add_argument("--reserved", type=int, default=0, help="reserved memory after this many ring splits")
    args = parser.parse_args()
    if args.reserved:
        row = reserved_case(args.reserved)
        print(row, flush=True)
        print("wrote", write_cases(args.out, f"step_streams_reserved{args.tag}", [row]))
        return
    if args.ring:
        rows = []
        for causal in (True, False) if args.noncausal else (True,):
            for name in args.ring_providers:
                for p in args.ring_parts:
                    rows.append(ring_case(name, args.seq, p, causal, args.rounds))
                    r = rows[-1]
                    print(name, "causal" if causal else "noncausal", f"P={p}",
                          {k: round(v, 3) for k, v in r["efficiency"].items()},
                          {k: round(r[f"{k}_peak_mib_above_inputs"]) for k in r["efficiency"]},
                          {k: r[f"{k}_dq_max_error"] for k in r["efficiency"]},
                          {k: round(r[f"{k}_host_ms"], 2) for k in r["efficiency"]}, flush=True)
                    torch.cuda.empty_cache()
        print("wrote", write_cases(args.out, f"step_streams_ring{args.tag}", rows))
        return
    provider = cpattn.PROVIDERS[args.provider]
    ranks, (full, dout, out, lse) = blocks_of(provider, args.seq, args.parts)
    fwd = {"whole": lambda: provider.forward(full)}
    bwd = {"whole": lambda: provider.backward(full, dout, out, lse)}
    for n in args.streams:
        fwd[f"streams_{n}"] = forward_split(provider, ranks, n)
        bwd[f"streams_{n}"] = backward_split(provider, ranks, n)
    # the split with side streams gives the same outputs as on one stream
    reference, *others = [fwd[f"streams_{n}"]() for n in args.streams]
    fwd_error = max((a.float() - b.float()).abs().max().item() for other in others for a, b in zip(reference, other))
    row = {"provider": args.provider, "S": args.seq, "P": args.parts, "causal": True, "layout": "zigzag", "H": 16,
           "D": 128, "forward_max_difference_between_stream_counts": fwd_error}
    for name, fns in (("forward", fwd), ("backward", bwd)):
        times = bench_alternating(fns, rounds=args.rounds)
        row[name] = times
        row[f"{name}_efficiency"] = {k: times["whole"]["median_ms"] / t["median_ms"]
                                     for k, t in times.items() if k != "whole"}
        print(name, {k: round(t["median_ms"], 3) for k, t in times.items()}, row[f"{name}_efficiency"], flush=True)
    path = write_cases(args.out, f"step_streams_probe{args.tag}", [row])
    print("wrote", path)


if __name__ == "__main__":
    main()
