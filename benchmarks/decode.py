"""Decode against a KV cache split over W ranks, simulated on one device: the partials, the combine, and the
alternative of gathering the cache.

    python benchmarks/decode.py                       # caches 128k..1M, 1 and 8 new tokens, W 8, Hq32 Hkv8 D128
    python benchmarks/decode.py --providers flash --caches 1048576 --ranks 4 8
    python benchmarks/decode.py --smoke               # CPU, tiny: does it run

`cpattn.sharded_kv_attention` on W ranks is: each rank's partial (out, lse) over its N / W cached keys on the
active provider, one all-gather of the partials (float32, W x B x Hq x T x (Dv + 1) values), one merge. Per
case (cache N, new tokens T, ranks W, provider):
- `partial_us`: one rank's partial: the provider's forward over N / W keys (a rank's critical path);
- `combine_us`: the combine's own work, the pack of this rank's (out, lse) into one float32 buffer and the merge
  of the W gathered partials into the output dtype (cpattn.ops.merge.pack_partial, merge_packed), timed as a CUDA graph replay (kernel time)
  and eagerly (host time included); `combine_bytes`: what the all-gather moves per rank, whose time is the
  network's (not measured here, one device);
- `gathered_local_us`: the alternative: one call over the whole N-key cache, as a rank that all-gathered the
  cache would run it (the gather of N x Hkv x D x 2 x 2 bytes per layer is not included, and would dominate);
- `speedup_vs_gathered` = gathered_local_us / (partial_us + combine_us), before any network.
- `max_diff`: the W partials merged against the whole call (float32 out).
Timing: `triton.testing.do_bench` for kernels (L2 flushed) on CUDA; CPU: torch.utils.benchmark.

`--graph-check` (CUDA): `sharded_kv_attention` over a one-rank gloo group on this GPU, captured in a CUDA graph
and replayed with new query values (`agree=False`: the agreement check reads signatures on the host); the replay
against an eager call; and the allocator's counters (cudaMalloc segments, allocation retries) over 200 warm eager
calls. Writes decode_<device>.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


class Case:
    def __init__(self, provider, n, t, w, device, hq, hkv, d):
        self.provider, self.n, self.t, self.w, self.device = provider, n, t, w, device
        self.hq, self.hkv, self.d = hq, hkv, d
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32


def _call(q, k, v):
    from cpattn.call import make_call

    return make_call(q, k, v, None, 0.0, False, None, q.shape[1] != k.shape[1])


def graph_time_us(fn, device) -> float | None:
    """GPU time per call of `fn` captured in a CUDA graph (common.capture_graph, common.replay_us); None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    return common.replay_us(common.capture_graph(fn)[0])


def eager_us(fn, device, calls: int = 300) -> float:
    """Wall time per call of `fn` back to back, drained at the end (host and GPU, whichever bounds)."""
    fn()
    common.sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    common.sync(device)
    return (time.perf_counter() - t0) * 1e6 / calls


def run_case(case: Case, smoke: bool) -> dict:
    import cpattn
    from cpattn.ops.merge import merge_packed, merge_stacked, pack_partial

    row = {"provider": case.provider, "cache": case.n, "new_tokens": case.t, "ranks": case.w, "Hq": case.hq,
           "Hkv": case.hkv, "D": case.d, "dtype": str(case.dtype).replace("torch.", "")}
    try:
        adapter = cpattn.get_provider(case.provider)
        q = torch.randn(1, case.hq, case.t, case.d, device=case.device, dtype=case.dtype)
        k, v = (torch.randn(1, case.hkv, case.n, case.d, device=case.device, dtype=case.dtype) for _ in range(2))
        edges = [r * case.n // case.w for r in range(case.w + 1)]
        slices = [(k[:, :, a:b].contiguous(), v[:, :, a:b].contiguous()) for a, b in zip(edges, edges[1:])]
        whole_call = _call(q, k, v)
        reasons = adapter.reasons(whole_call, need_lse=True)
        if reasons:
            raise RuntimeError("; ".join(reasons))
        rank_calls = [_call(q, sk, sv) for sk, sv in slices]
        partials = [adapter.forward(c) for c in rank_calls]
        outs = torch.stack([o.float() for o, _ in partials])
        lses = torch.stack([lse.float() for _, lse in partials])
        merged, _ = merge_stacked(outs, lses)
        whole_out, _ = adapter.forward(whole_call)
        row["max_diff"] = (merged - whole_out.float()).abs().max().item()
        gathered = torch.stack([pack_partial(o, lse) for o, lse in partials])
        row["combine_bytes"] = gathered.numel() * gathered.element_size()
        packed_out, _ = merge_packed(gathered, torch.float32)
        row["max_diff_packed_vs_stacked"] = (packed_out - merged).abs().max().item()

        def combine():  # what sharded_kv_attention runs around its all-gather: this rank's pack, the merge
            pack_partial(*partials[0])
            return merge_packed(gathered, case.dtype)

        bench = (lambda fn: common.bench(fn, case.device, cpu_seconds=0.02 if smoke else 0.2)["median_ms"] * 1e3)
        row["partial_us"] = bench(lambda: adapter.forward(rank_calls[0]))
        row["gathered_local_us"] = bench(lambda: adapter.forward(whole_call))
        row["combine_us_graph"] = graph_time_us(combine, case.device)
        row["combine_us_eager"] = eager_us(combine, case.device, 50 if smoke else 300)
        combine_us = row["combine_us_graph"] if row["combine_us_graph"] is not None else row["combine_us_eager"]
        row["combine_us"] = combine_us
        row["speedup_vs_gathered"] = row["gathered_local_us"] / (row["partial_us"] + combine_us)
    except Exception as exc:  # recorded; the suite goes on
        row["error"] = common.error_text(exc)
    return row


def graph_check(provider: str, device: str, smoke: bool) -> dict:
    """sharded_kv_attention over a one-rank group: CUDA-graph capture and replay, and the allocator over warm
    calls (see the module docstring)."""
    import torch.distributed as dist

    import cpattn

    out = {"provider": provider}
    created = not dist.is_initialized()
    if created:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        group = dist.new_group([0], backend="gloo")
        n, t = (256, 2) if smoke else (131072, 8)
        q = torch.randn(1, 32, t, 128, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, n, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
        with cpattn.attention_provider(provider):
            def call(agree: bool = True):
                return cpattn.sharded_kv_attention(q, k, v, group, enable_gqa=True, agree=agree)

            for _ in range(3):
                call()
            torch.cuda.synchronize()
            before = torch.cuda.memory_stats()
            for _ in range(200):
                call()
            torch.cuda.synchronize()
            after = torch.cuda.memory_stats()
            out["warm_calls"] = 200
            out["segments_allocated_during"] = after["segment.all.allocated"] - before["segment.all.allocated"]
            out["alloc_retries_during"] = after["num_alloc_retries"] - before["num_alloc_retries"]
            out["reserved_bytes_change"] = after["reserved_bytes.all.current"] - before["reserved_bytes.all.current"]
            out["cached_blocks_handed_out_per_call"] = (after["allocation.all.allocated"]
                                                        - before["allocation.all.allocated"]) / 200
            try:
                graph, static_out = common.capture_graph(lambda: call(agree=False), warmups=1)
                q.copy_(torch.randn_like(q))
                graph.replay()
                torch.cuda.synchronize()
                eager = call()
                out["graph_captured"] = True
                out["graph_vs_eager_max_diff"] = (static_out.float() - eager.float()).abs().max().item()
                out["graph_replay_us"] = common.replay_us(graph)
                out["eager_us"] = eager_us(call, device)
            except Exception as exc:
                out["graph_captured"] = False
                out["graph_error"] = common.error_text(exc)
    finally:
        if created:
            dist.destroy_process_group()
    return out


def summary_line(row: dict) -> str:
    head = f"{row['provider']} cache={row['cache']} T={row['new_tokens']} W={row['ranks']}"
    if "error" in row:
        return f"{head}: {row['error']}"
    return (f"{head}: partial {row['partial_us']:.1f} us, combine {row['combine_us']:.1f} us "
            f"(eager {row['combine_us_eager']:.1f}), gathered local call {row['gathered_local_us']:.1f} us, "
            f"speed-up {row['speedup_vs_gathered']:.2f}, diff {row['max_diff']:.1e}")


def plot(payload: dict, path: str) -> str | None:
    plt = common.pyplot()
    rows = [r for r in payload["cases"] if "error" not in r]
    if plt is None or not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key in sorted({(r["provider"], r["new_tokens"], r["ranks"]) for r in rows}):
        pts = sorted((r["cache"], r) for r in rows if (r["provider"], r["new_tokens"], r["ranks"]) == key)
        label = common.legend_label(f"{key[0]} T={key[1]} W={key[2]}")
        axes[0].plot([n for n, _ in pts], [r["speedup_vs_gathered"] for _, r in pts], marker="o", label=label)
        axes[1].plot([n for n, _ in pts], [r["combine_us"] for _, r in pts], marker="o", label=label)
    axes[0].set_ylabel("gathered local call / (partial + combine)")
    axes[1].set_ylabel("combine (pack + merge) us")
    axes[1].axhline(10, color="r", lw=0.8)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cached tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"decode against a sharded KV cache, simulated ranks: {payload['device']}")
    return common.save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when a GPU is present")
    parser.add_argument("--providers", nargs="*", help="default: flash _native_efficient _native_flash (cuda)")
    parser.add_argument("--caches", type=int, nargs="*", default=[131072, 262144, 524288, 1048576])
    parser.add_argument("--new-tokens", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--ranks", type=int, nargs="*", default=[8])
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--graph-check", action="store_true", help="(CUDA) capture sharded_kv_attention in a graph")
    parser.add_argument("--smoke", action="store_true", help="CPU-sized: cache 512, W 4, Hq4 Hkv2 D16")
    common.add_output_arguments(parser)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.caches, args.ranks, args.q_heads, args.kv_heads, args.head_dim = [512], [4], 4, 2, 16
    providers = args.providers or (["flash", "_native_efficient", "_native_flash"] if device == "cuda"
                                   else ["native"])
    label = common.device_name(device)
    payload = {"suite": "decode", "device": label, "environment": common.environment(), "cases": []}
    combos = [(p, n, t, w) for p in providers for n in args.caches for t in args.new_tokens for w in args.ranks]
    for p, n, t, w in common.progress(combos, "decode", not args.quiet):
        case = Case(p, n, t, w, device, args.q_heads, args.kv_heads, args.head_dim)
        payload["cases"].append(run_case(case, args.smoke))
        print(summary_line(payload["cases"][-1]), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    if args.graph_check and device == "cuda":
        payload["graph_check"] = [graph_check(p, device, args.smoke) for p in providers]
        for g in payload["graph_check"]:
            print("graph check:", g, flush=True)
    path = common.write_results(common.results_path("decode", label, args.out, args.tag), payload)
    png = None if args.no_plot else plot(payload, path)
    print(f"wrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
