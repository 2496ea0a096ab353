"""Packed ring split on one device: a document-sharded packed ring's work without its network, against one call.

    python benchmarks/packed_ring.py                         # S 128k in P=8 blocks, log-normal lengths mean 4k
    python benchmarks/packed_ring.py --seqs 65536 131072 --parts 4 8 --sigmas 0.5 1.0 1.5
    python benchmarks/packed_ring.py --smoke                 # CPU, tiny: does it run

A packed stream of S tokens, documents of log-normal lengths (mean --mean, sigma --sigma), is sharded by
documents over P ranks (cpattn.packed.shard_packed: long documents zigzag in 2P chunks, short ones whole; see
cpattn/cp/packed_layout.py). `split`: every rank's packed ring, forward and backward (causal by default), one rank
after another on this device, each receiving the other ranks' key blocks from a loopback channel (the ranges
its step plans name, as the network would bring them). `whole`: one varlen kernel call over the whole stream,
forward and backward, with the stream's cu_seqlens. Efficiency = whole time / split time: what P devices can
reach before any communication. On CUDA both are also timed with the host ahead of the GPU (`efficiency_queued`,
common.bench_queued), as inside a model: the split issues many more launches than one call, and timed alone its
GPU can wait on the host. `max_diff_vs_whole`: every rank's dQ against the whole call's (a loopback
brings no other rank's dK/dV parts, so of the split's gradients only dQ is meaningful).

Each case also records, without timing anything: the largest rank's counted causal work (per query token, the
keys of its document it sees) over the mean, and the same for shards by position (cpattn.shard_sequence's zigzag)
of the same stream; the K/V bytes a rank holds at the peak of the packed ring (its shard, and the two received
blocks in flight at once) against all-gather (the whole stream's K/V), per rank; the K/V bytes each rank sends.

Provider: `flash_varlen` on CUDA (bf16, H=16 query and key/value heads, D=128), `native` on CPU (float32: the
varlen library does not run there; its `whole` is the provider on the stream's documents). Writes
packed_ring_<device>.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the loopback channels' completed exchange lives with the ring's loopback stand-in
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "support"))

from benchmarks import common  # noqa: E402
from loopback_ring import Received  # noqa: E402


def lognormal_bounds(s: int, mean: float, sigma: float, seed: int) -> list[int]:
    """Document boundaries of `s` tokens with log-normal lengths of mean `mean` (the last one cut to fit)."""
    rng, mu = random.Random(seed), math.log(mean) - sigma ** 2 / 2
    bounds = [0]
    while bounds[-1] < s:
        bounds.append(min(s, bounds[-1] + max(1, int(rng.lognormvariate(mu, sigma)))))
    return bounds


class Loopback:
    """A channel with no network (`PackedRingSpec.channel_factory`), to run one rank's packed ring alone: every
    exchange completes at once, its receive buffers as they were (the forward's key blocks come from
    `loopback_blocks` instead; the backward's dK/dV parts, which only the owner would sum, stay unfilled)."""

    def __call__(self, group, timeout, stats):
        return self

    def send_recv(self, send, to_rank, recv, from_rank, kind):
        return Received(recv)


def loopback_blocks(shards, layout, causal: bool):
    """`PackedRingSpec.block_source` with no network: each step's key block as the owner's ranges would arrive,
    made once (outside any timing), as the network would bring them."""
    from cpattn.cp.packed_plan import step_plan

    made = {}

    def block(consumer: int, owner: int):
        if (consumer, owner) not in made:
            plan = step_plan(layout, consumer, owner, causal)
            k, v = shards[owner]
            made[consumer, owner] = tuple(torch.cat([x[a:b] for a, b in plan.kv]) for x in (k, v))
        return made[consumer, owner]
    return block


class Case:
    def __init__(self, provider, s, p, mean, sigma, seed, causal, device, heads, kv_heads, d):
        self.provider, self.s, self.p, self.mean, self.sigma, self.seed = provider, s, p, mean, sigma, seed
        self.causal, self.device, self.heads, self.kv_heads, self.d = causal, device, heads, kv_heads, d
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32


def packed_split_case(case: Case):
    """(whole, split, layout, shards): one kernel call over the whole stream and all P ranks' packed rings one
    after another. Both return dQ: `whole` of the stream, `split` each rank's in its local order."""
    import cpattn
    from cpattn.cp.comm import CommStats
    from cpattn.cp.mesh import Group
    from cpattn.cp.packed_plan import Chain, Piece, step_plan
    from cpattn.cp.packed_ring import PackedRingSpec, packed_ring_backward, packed_ring_forward
    from cpattn.packed import block_kernel, packed_layout, packed_view

    bounds = lognormal_bounds(case.s, case.mean, case.sigma, case.seed)
    layout = packed_layout(bounds, case.p)
    make = lambda h: torch.randn(case.s, h, case.d, device=case.device, dtype=case.dtype)  # noqa: E731
    q, k, v, dout = make(case.heads), make(case.kv_heads), make(case.kv_heads), make(case.heads)
    adapter = cpattn.get_provider(case.provider)
    kernel, _, reasons = block_kernel(adapter, packed_view(q, k, v, case.causal, None))
    if reasons:
        raise RuntimeError(f"{case.provider}: {'; '.join(reasons)}")
    whole_chain = Chain(0, case.s, 0, case.s, case.causal,
                        tuple(Piece(a, b, a, b, case.causal) for a, b in zip(bounds, bounds[1:]) if b > a))

    def whole():
        out, lse = kernel.forward(q, k, v, whole_chain)
        return kernel.backward(dout, q, k, v, out, lse, whole_chain)[0]

    positions = [torch.tensor(layout.positions(r), dtype=torch.long, device=case.device) for r in range(case.p)]
    local = [tuple(t.index_select(0, i) for t in (q, k, v, dout)) for i in positions]
    shards = [(lk, lv) for _, lk, lv, _ in local]

    blocks = loopback_blocks(shards, layout, case.causal)
    for r in range(case.p):  # every block made before the timings
        for s in range(case.p):
            if s != r and step_plan(layout, r, s, case.causal) is not None:
                blocks(r, s)

    def split(kernel=kernel):
        grads = []
        for r in range(case.p):
            spec = PackedRingSpec(Group(None, r, case.p, "loopback"), layout, case.causal, None, CommStats(),
                                  channel_factory=Loopback(), block_source=blocks)
            lq, lk, lv, ldo = local[r]
            out, lse, last = packed_ring_forward(kernel, spec, lq, lk, lv)
            grads.append(packed_ring_backward(kernel, spec, lq, lk, lv, ldo, out, lse, last)[0])
        return grads

    split.per_chain_dq = lambda: split(PerChainDq(kernel))  # the same, each chain with its own dQ
    return whole, split, layout, positions


class PerChainDq:
    """A packed ring kernel without one dQ accumulator per rank (`shared_rows` None): every chain runs its whole
    backward and the rank sums the chains' dQ, as where the kernel keeps no accumulator."""

    def __init__(self, kernel):
        self._kernel = kernel

    def forward(self, *args):
        return self._kernel.forward(*args)

    def backward(self, *args):
        return self._kernel.backward(*args)

    def shared_rows(self, *args):
        return None


def memory_and_traffic(case: Case, layout) -> dict:
    """K/V bytes per rank: held at the packed ring's peak (own shard + the two largest consecutive blocks it
    receives; the forward's last block is kept for the backward, whose first step it is), held under all-gather
    (the whole stream), and sent over a forward and backward."""
    from cpattn.cp.packed_plan import step_plan

    per_token = 2 * case.kv_heads * case.d * torch.finfo(case.dtype).bits // 8  # K and V
    held, sent = [], []
    for r in range(case.p):
        received = [0] + [(lambda plan: plan.kv_len if plan else 0)(step_plan(layout, r, (r - s) % case.p,
                                                                                case.causal))
                          for s in range(1, case.p)]
        peak = max(a + b for a, b in zip(received, received[1:] + [0]))
        held.append((layout.length(r) + peak) * per_token)
        out = [step_plan(layout, (r + s) % case.p, r, case.causal) for s in range(1, case.p)]
        out += [step_plan(layout, (r + s) % case.p, r, case.causal) for s in range(1, case.p - 1)]
        sent.append(sum(p.kv_len for p in out if p is not None) * per_token)
    return {"kv_bytes_held_per_rank": held, "kv_bytes_held_allgather": case.s * per_token,
            "kv_held_max_over_allgather": max(held) / (case.s * per_token), "kv_bytes_sent_per_rank": sent}


def position_sharded_balance(bounds: list[int], p: int) -> float:
    """Largest over mean counted causal work of shards by position (cpattn.shard_sequence, zigzag)."""
    import bisect

    from cpattn.cp.layout import ring_positions

    work = []
    for r in range(p):
        pos = ring_positions(bounds[-1], p, r, "zigzag").tolist()
        work.append(sum(x - bounds[bisect.bisect_right(bounds, x) - 1] + 1 for x in pos))
    return max(work) / (sum(work) / p)


def plan_counts(layout, causal: bool) -> dict:
    """What the step plans of one forward over all ranks hold (the backward makes as many calls): varlen calls
    (one per chain's window group), pieces and their median rows."""
    from cpattn.cp.packed_plan import step_plan
    from cpattn.packed_varlen import kernel_calls

    plans = [step_plan(layout, r, s, causal) for r in range(layout.world) for s in range(layout.world)]
    chains = [c for plan in plans if plan is not None for c in plan.chains]
    rows = sorted(p.q1 - p.q0 for c in chains for p in c.pieces)
    return {"forward_kernel_calls": sum(len(kernel_calls(c)) for c in chains), "pieces": len(rows),
            "median_piece_rows": rows[len(rows) // 2] if rows else 0}


def layout_row(case: Case, layout) -> dict:
    """The case's layout and plans, counted without running anything."""
    bounds = list(layout.bounds)
    tokens = [layout.length(r) for r in range(case.p)]
    row = {"documents": len(bounds) - 1, "document_lengths": [b - a for a, b in zip(bounds, bounds[1:])],
           "split_documents": sum(layout.split), "split_group_sizes": sorted(len(g) for g in layout.groups.values()),
           **plan_counts(layout, case.causal),
           "counted_work_per_rank": [layout.counted_work(r, case.causal) for r in range(case.p)],
           "work_max_over_mean": layout.balance(case.causal),
           "position_sharded_work_max_over_mean": position_sharded_balance(bounds, case.p) if case.causal else None,
           "tokens_per_rank": tokens, "tokens_max_over_mean": max(tokens) / (sum(tokens) / case.p)}
    row.update(memory_and_traffic(case, layout))
    return row


def run_case(case: Case, args) -> dict:
    row = {"provider": case.provider, "S": case.s, "P": case.p, "mean": case.mean, "sigma": case.sigma,
           "seed": case.seed, "causal": case.causal, "heads": case.heads, "kv_heads": case.kv_heads, "D": case.d,
           "dtype": str(case.dtype).replace("torch.", "")}
    try:
        if args.plans_only:
            from cpattn.packed import packed_layout

            row.update(layout_row(case, packed_layout(lognormal_bounds(case.s, case.mean, case.sigma, case.seed),
                                                      case.p)))
            return row
        whole, split, layout, positions = packed_split_case(case)
        row.update(layout_row(case, layout))
        full = whole()
        row["max_diff_vs_whole"] = max((full.index_select(0, i).double() - part.double()).abs().max().item()
                                       for i, part in zip(positions, split()) if i.numel())
        fns = {"whole": whole, "split": split}
        if args.per_chain_dq:
            fns["split_per_chain_dq"] = split.per_chain_dq
            row["per_chain_dq_max_diff_vs_whole"] = max(
                (full.index_select(0, i).double() - part.double()).abs().max().item()
                for i, part in zip(positions, split.per_chain_dq()) if i.numel())
        times = common.bench_alternating(fns, case.device, args.rounds, cpu_seconds=0.02 if args.smoke else 0.2)
        row.update(times)
        row["efficiency"] = row["whole"]["median_ms"] / row["split"]["median_ms"]
        if args.per_chain_dq:
            row["efficiency_per_chain_dq"] = row["whole"]["median_ms"] / row["split_per_chain_dq"]["median_ms"]
        if case.device == "cuda":  # the same with the host ahead of the GPU, as inside a model
            row.update(queued_row(fns, args.rounds))
        row["split_host_ms"] = common.host_ms(split, case.device, repeats=2 if args.smoke else 5)
        if args.profile:
            row["split_host_profile"] = host_profile(split, case.device)
            if case.device == "cuda":
                row["split_gpu_profile"] = gpu_profile(split)
    except Exception as exc:  # recorded; the suite goes on with the next case
        row["error"] = common.error_text(exc)
    return row


def queued_row(fns: dict, rounds: int) -> dict:
    """`common.bench_queued` of the case's functions and their efficiencies, or the error it raised (recorded
    beside the isolated timings, which it leaves as they are)."""
    try:
        queued = common.bench_queued(fns, rounds)
    except Exception as exc:
        return {"queued_error": common.error_text(exc)}
    row = {f"{name}_queued": t for name, t in queued.items()}
    for name in queued:
        if name != "whole":
            key = "efficiency_queued" if name == "split" else f"efficiency_{name[len('split_'):]}_queued"
            row[key] = queued["whole"]["median_ms"] / queued[name]["median_ms"]
    return row


def host_profile(fn, device, top: int = 25) -> list[dict]:
    """cProfile of one call of `fn` (warm): the functions with the most host time of their own."""
    import cProfile
    import pstats

    fn()
    common.sync(device)
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    common.sync(device)
    stats = pstats.Stats(profiler).sort_stats("tottime")
    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in list(stats.stats.items()):
        rows.append({"function": f"{os.path.basename(path)}:{line}({name})", "calls": calls,
                     "own_ms": own * 1e3, "cumulative_ms": cumulative * 1e3})
    return sorted(rows, key=lambda r: -r["own_ms"])[:top]


def gpu_profile(fn, top: int = 12) -> dict:
    """torch.profiler of one call of `fn`: kernel time, GPU idle time and gaps, and the host's CUDA runtime calls
    that wait (synchronisations, blocking copies)."""
    prof = common.profile_call(fn)
    averages = prof.key_averages()
    runtime = [e for e in averages if e.key.startswith("cuda") and e.device_type.name == "CPU"]
    out = common.kernel_summary(averages, top)
    out["cuda_runtime_calls"] = [{"name": e.key, "count": e.count, "ms": e.cpu_time_total / 1e3}
                                 for e in sorted(runtime, key=lambda e: -e.cpu_time_total)[:top]]
    out.update(common.gpu_idle(prof, top))
    return out


def summary_line(row: dict) -> str:
    head = f"S={row['S']} P={row['P']} mean={row['mean']} sigma={row['sigma']}"
    if "error" in row:
        return f"{head}: {row['error']}"
    if "efficiency" not in row:  # --plans-only
        return (f"{head}: {row['forward_kernel_calls']} forward calls, {row['pieces']} pieces (median "
                f"{row['median_piece_rows']} rows), work max/mean {row['work_max_over_mean']:.3f}, K/V held "
                f"{row['kv_held_max_over_allgather']:.3f} of all-gather")
    queued = f" (host ahead: {row['efficiency_queued']:.3f})" if "efficiency_queued" in row else ""
    if "efficiency_per_chain_dq" in row:
        queued += f", per-chain dQ {row['efficiency_per_chain_dq']:.3f}"
        queued += f" ({row['efficiency_per_chain_dq_queued']:.3f})" if "efficiency_per_chain_dq_queued" in row else ""
    return (f"{head}: efficiency {row['efficiency']:.3f}{queued}, work max/mean {row['work_max_over_mean']:.3f} "
            f"(by position {row['position_sharded_work_max_over_mean'] or float('nan'):.3f}), K/V held "
            f"{row['kv_held_max_over_allgather']:.3f} of all-gather, dQ diff {row['max_diff_vs_whole']:.2e}")


def plot(payload: dict, path: str) -> str | None:
    plt = common.pyplot()
    rows = [r for r in payload["cases"] if "efficiency" in r]
    if plt is None or not rows:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    size = lambda n: f"{n // 1024}k" if n >= 1024 else str(n)  # noqa: E731
    labels = [f"S={size(r['S'])} P={r['P']} sigma={r['sigma']}" for r in rows]
    x = range(len(rows))
    axes[0].bar(x, [r["efficiency"] for r in rows])
    axes[0].set_ylabel("whole call time / split time")
    axes[0].axhline(1.0, color="k", lw=0.8)
    width = 0.4
    axes[1].bar([i - width / 2 for i in x], [r["work_max_over_mean"] for r in rows], width, label="by documents")
    axes[1].bar([i + width / 2 for i in x], [r["position_sharded_work_max_over_mean"] or 0 for r in rows], width,
                label="by position (zigzag)")
    axes[1].set_ylabel("largest rank's counted work / mean")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].legend(fontsize=7)
    axes[2].bar(x, [r["kv_held_max_over_allgather"] for r in rows])
    axes[2].set_ylabel("K/V held per rank (max) / all-gather")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"packed ring split on one device: {payload['device']}")
    return common.save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when a GPU is present")
    parser.add_argument("--provider", help="default: flash_varlen on cuda, native on cpu")
    parser.add_argument("--seqs", type=int, nargs="*", help="stream lengths S (default 131072; smoke: 384)")
    parser.add_argument("--parts", type=int, nargs="*", help="ranks P (default 8; smoke: 4)")
    parser.add_argument("--mean", type=float, default=4096, help="mean document length (smoke: 48)")
    parser.add_argument("--sigmas", type=float, nargs="*", default=[1.0], help="sigma of the log-normal lengths")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document lengths")
    parser.add_argument("--noncausal", action="store_true", help="attention within documents without causality")
    parser.add_argument("--heads", type=int, default=16, help="query heads")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="balanced rounds per timing")
    parser.add_argument("--profile", action="store_true", help="cProfile one split: where its host time goes")
    parser.add_argument("--per-chain-dq", action="store_true",
                        help="also time the split without one dQ accumulator per rank (each chain's own dQ, summed)")
    parser.add_argument("--plans-only", action="store_true",
                        help="count the layout and step plans (calls, pieces, balance, K/V held and sent); no timing")
    parser.add_argument("--smoke", action="store_true", help="CPU-sized: S=384, P=4, mean 48, H=2, D=16, 2 rounds")
    common.add_output_arguments(parser)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here")
    seqs, parts, mean, h, d = args.seqs or [131072], args.parts or [8], args.mean, args.heads, args.head_dim
    if args.smoke:
        seqs, parts, h, d, args.rounds = args.seqs or [384], args.parts or [4], 2, 16, min(args.rounds, 2)
        mean = 48 if args.mean == parser.get_default("mean") else args.mean
    provider = args.provider or ("flash_varlen" if device == "cuda" else "native")
    label = common.device_name(device)
    payload = {"suite": "packed_ring", "device": label, "environment": common.environment(), "rounds": args.rounds,
               "cases": []}
    combos = [(s, p, sigma) for s in seqs for p in parts for sigma in args.sigmas]
    for s, p, sigma in common.progress(combos, "packed ring", not args.quiet):
        case = Case(provider, s, p, mean, sigma, args.seed, not args.noncausal, device, h, args.kv_heads or h, d)
        payload["cases"].append(run_case(case, args))
        print(summary_line(payload["cases"][-1]), flush=True)
    path = common.write_results(common.results_path("packed_ring", label, args.out, args.tag), payload)
    png = None if args.no_plot else plot(payload, path)
    print(f"wrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
