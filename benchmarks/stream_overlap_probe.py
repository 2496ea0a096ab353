"""Does running a ring rank's block kernels on two CUDA streams, in turn, make the split faster on one GPU?

    python benchmarks/stream_overlap_probe.py --providers flash _native_cudnn --seq 65536 --parts 4

A ring rank's block results are independent of each other until they are merged (forward) or summed
(backward), so consecutive blocks may run on different streams. Each block kernel ends in a partial wave
(its last tiles leave SMs idle), and a backward call starts and ends with memory-bound passes (FA4's and
cuDNN's dO.O pass and dQ conversion). With blocks on two streams, the next block's first tiles can fill
those gaps. This probe times, call by call (benchmarks/run.py `bench_interleaved`), one whole-sequence call
against all P ranks' blocks on one stream and on two streams, forward and forward+backward, using the
ring's own block plans and the provider's adapter; no communication. It writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cpattn  # noqa: E402
from benchmarks.run import RESULTS, bench_interleaved, paired_ratio, write_cases  # noqa: E402
from cpattn.ops import gradsum  # noqa: E402
from cpattn.cp.comm import CommStats  # noqa: E402
from cpattn.cp.layout import ring_positions  # noqa: E402
from cpattn.cp.mesh import Group  # noqa: E402
from cpattn.cp.ring import RingSpec, _block_call, _row_slices, block_plan  # noqa: E402
from cpattn.dispatch import make_call  # noqa: E402
from cpattn.ops.merge import PartialAttention  # noqa: E402


def rank_blocks(adapter, q, k, v, dout, out, lse, s, p, r):
    """Rank r's (block call, rows plan, row slices) for every step, in ring order, with its shards."""
    spec = RingSpec(Group(None, r, p, "loopback"), "zigzag", s, 60.0, CommStats())
    mine = ring_positions(s, p, r, "zigzag", q.device)
    lq, ldo, lo, ll = (t.index_select(2, mine) for t in (q, dout, out, lse))
    call = make_call(lq, k.index_select(2, mine), v.index_select(2, mine), None, 0.0, True, None, False)
    rows = _row_slices(adapter, call, query=lq, dout=ldo, out=lo, lse=ll)
    steps = []
    for step in range(p):
        src = (r - step) % p
        theirs = ring_positions(s, p, src, "zigzag", q.device)
        bk, bv = k.index_select(2, theirs).contiguous(), v.index_select(2, theirs).contiguous()
        plan = block_plan(spec, r, src, True)
        if plan is not None:
            steps.append((_block_call(call, spec, src, bk, bv, plan, rows), plan))
    return call, rows, steps


def make_split(adapter, ranks, backward: bool, streams: list):
    """All ranks' blocks; block i of a rank on streams[i % len(streams)], merged/summed on the main stream."""
    main = torch.cuda.current_stream()

    def run_on(i, fn):
        stream = streams[i % len(streams)]
        if stream is main:
            return fn()
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            return fn()

    def split():
        for call, rows, steps in ranks:
            results = [run_on(i, lambda c=c: adapter.forward(c)) for i, (c, _) in enumerate(steps)]
            for stream in streams:
                main.wait_stream(stream)
            acc = PartialAttention(call.batch, call.q_heads, call.q_len, call.value_dim, call.device)
            for (c, plan), (o, l_) in zip(steps, results):
                acc.add_rows(plan.rows, o, l_)
            acc.result(call.dtype)
            if not backward:
                continue
            grads = [run_on(i, lambda c=c, plan=plan: adapter.backward(
                c, rows.get("dout", plan.rows), rows.get("out", plan.rows), rows.get("lse", plan.rows)))
                for i, (c, plan) in enumerate(steps)]
            for stream in streams:
                main.wait_stream(stream)
            dq = gradsum.RowSum(call.query.shape, call.device)
            dk = gradsum.RowSum(call.key.shape, call.device)
            dv = gradsum.RowSum(call.value.shape, call.device)
            for (c, plan), (gq, gk, gv) in zip(steps, grads):
                dq.add(plan.rows, gq)
                dk.add(plan.cols, gk)  # the owner's sum in a real ring: the same parts and bytes, another rank
                dv.add(plan.cols, gv)
            dq.result(call.dtype), dk.result(call.dtype), dv.result(call.dtype)
    return split


def case(provider: str, s: int, p: int, backward: bool, h=16, d=128) -> dict:
    adapter = cpattn.PROVIDERS[provider]
    q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    full = make_call(q, k, v, None, 0.0, True, None, False)
    out, lse = adapter.forward(full)

    def whole():
        o, l_ = adapter.forward(full)
        if backward:
            adapter.backward(full, dout, o, l_)
    ranks = [rank_blocks(adapter, q, k, v, dout, out, lse, s, p, r) for r in range(p)]
    main = torch.cuda.current_stream()
    fns = {"whole": whole,
           "one_stream": make_split(adapter, ranks, backward, [main]),
           "two_streams": make_split(adapter, ranks, backward, [main, torch.cuda.Stream()])}
    times = bench_interleaved(fns, budget_ms=12000, min_calls=20)
    row = {"provider": provider, "S": s, "P": p, "backward": backward, "H": h, "D": d}
    calls = {name: times[name].pop("call_ms") for name in fns}
    for name in fns:
        row[name] = times[name]
    for name in ("one_stream", "two_streams"):
        row[f"efficiency_{name}"] = row["whole"]["median_ms"] / row[name]["median_ms"]
        row[f"efficiency_{name}_paired"] = paired_ratio(calls["whole"], calls[name])
    row["two_over_one_paired"] = paired_ratio(calls["one_stream"], calls["two_streams"])
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", nargs="*", default=["flash", "_native_cudnn"])
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default="stream_overlap_probe")
    args = parser.parse_args(argv)
    rows = []
    for provider in args.providers:
        for backward in (False, True):
            try:
                row = case(provider, args.seq, args.parts, backward)
            except Exception as exc:
                row = {"provider": provider, "backward": backward, "error": f"{type(exc).__name__}: {exc}"[:400]}
            rows.append(row)
            print(json.dumps({key: val for key, val in row.items() if "efficiency" in key or key in
                              ("provider", "backward", "two_over_one_paired", "error")}), flush=True)
            torch.cuda.empty_cache()
    print(f"wrote {write_cases(args.out, args.tag, rows)}")


if __name__ == "__main__":
    main()
