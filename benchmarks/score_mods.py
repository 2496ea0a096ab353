"""Windows, softcaps and sinks on one device: what they cost, and the windowed ring's split against one call.

    python benchmarks/score_mods.py                                  # every section, B1 H16 D128 bf16
    python benchmarks/score_mods.py --sections kernels --providers flash flex --windows 1024 4096
    python benchmarks/score_mods.py --smoke                          # CPU, tiny: does it run

Sections:
- `kernels`: one windowed causal call, window (w - 1, 0), against full causal attention at S (default 65536),
  forward and forward+backward, through `cpattn.attention_dispatch` under `attention_provider(p)`, for each
  provider that takes the call (flash, flex, _native_cudnn by default). `vs_causal` = windowed time / causal time;
  a provider that skips the work outside the window approaches (w / (S / 2)) plus its fixed cost, one that runs
  the window as a mask (SDPA backends) stays near 1 or above.
- `overhead`: softcap, sinks (a (H,) float32 parameter with a gradient) and both against the plain causal call
  on `flash`, forward and forward+backward, at --overhead-seqs; the functions take turns call by call
  (`common.bench_interleaved`), and `overhead` is the paired ratio minus one; with FA4 installed, its own
  `flash_attn_func` with and without the same softcap and sinks takes turns with them (`library ...`).
- `ring`: the windowed ring (cpattn/cp/halo.py) of P ranks at S (default 131072, P 8, window 4096), one rank
  after another on this device: each rank's blocks against its own keys and the halos it receives (delivered by a
  loopback channel: the runs the plan names, taken from their owners' shards beforehand), its merges and its
  backward with dQ/dK/dV sums, with each query chunk fused into one call (`--halo fused`) or one call per run of
  keys (`separate`), against one windowed call over the whole sequence, forward and backward.
  Efficiency = whole time / split time (the ring-split accounting: what P devices can reach before any
  communication); `max_diff_vs_whole`: every rank's dQ against the whole call's rows. Also the K/V bytes each
  rank sends under the plan, against the rotating ring's W - 1 shards.

On CUDA bf16 with B1 H16 D128; on CPU (--smoke) float32, B1 H2 D16, native and _native_math. Writes
score_mods_<device>.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the loopback channels' completed exchange lives with the ring's loopback stand-in
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "support"))

from benchmarks import common  # noqa: E402
from loopback_ring import Received  # noqa: E402

SECTIONS = ("kernels", "overhead", "ring")


class Shape:
    def __init__(self, device: str, h: int, d: int):
        self.device, self.h, self.d = device, h, d
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def tensor(self, s: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(1, self.h, s, self.d, device=self.device, dtype=self.dtype, requires_grad=grad)


def dispatch_runner(provider: str, shape: Shape, s: int, backward: bool, **mods):
    """A function running one causal `attention_dispatch` call (and its backward) on fixed inputs under
    `attention_provider(provider)`; `mods`: window, softcap, sinks."""
    import cpattn

    q, k, v = (shape.tensor(s, backward) for _ in range(3))
    dout = shape.tensor(s)

    def run():
        with cpattn.attention_provider(provider):
            out = cpattn.attention_dispatch(q, k, v, is_causal=True, **mods)
        if backward:
            out.backward(dout)
        return out

    return run


def kernels_section(args, shape: Shape) -> list[dict]:
    rows = []
    cases = [(p, w, b) for p in args.providers for b in (False, True) for w in [None] + args.windows]
    for provider, w, backward in common.progress(cases, "windowed kernels", not args.quiet):
        row = {"provider": provider, "S": args.seq, "window": w, "direction": "fwd+bwd" if backward else "fwd"}
        try:
            mods = {} if w is None else {"window": (w - 1, 0)}
            row.update(common.bench(dispatch_runner(provider, shape, args.seq, backward, **mods), shape.device))
        except Exception as exc:  # recorded (a provider that refuses the call, out of memory); the suite goes on
            row["error"] = common.error_text(exc)
        rows.append(row)
        common.sync(shape.device)
    for row in rows:  # against the same provider's full causal call
        base = next((r for r in rows if r["provider"] == row["provider"] and r["window"] is None
                     and r["direction"] == row["direction"] and "median_ms" in r), None)
        if base is not None and "median_ms" in row:
            row["vs_causal"] = row["median_ms"] / base["median_ms"]
    return rows


def overhead_section(args, shape: Shape) -> list[dict]:
    rows = []
    provider = args.overhead_provider
    for s, backward in common.progress([(s, b) for s in args.overhead_seqs for b in (False, True)],
                                       "softcap and sinks", not args.quiet):
        sinks = torch.randn(shape.h, device=shape.device, dtype=torch.float32, requires_grad=backward)
        variants = {"plain": {}, "softcap": {"softcap": 30.0}, "sinks": {"sinks": sinks},
                    "softcap+sinks": {"softcap": 30.0, "sinks": sinks}}
        row = {"provider": provider, "S": s, "direction": "fwd+bwd" if backward else "fwd"}
        try:
            fns = {name: dispatch_runner(provider, shape, s, backward, **mods) for name, mods in variants.items()}
            library = library_runners(provider, shape, s, backward, sinks) if args.library else {}
            fns.update(library)
            times = common.bench_interleaved(fns, shape.device, warmup_ms=20 if args.smoke else 200,
                                             budget_ms=300 if args.smoke else 6000, min_calls=12)
            calls = {name: times[name].pop("call_ms") for name in fns}
            for name in fns:
                row[name] = times[name]
                base = "library plain" if name.startswith("library") else "plain"
                if name != base:
                    row[name]["overhead"] = common.paired_ratio(calls[name], calls[base]) - 1.0
        except Exception as exc:
            row["error"] = common.error_text(exc)
        rows.append(row)
    return rows


def library_runners(provider: str, shape: Shape, s: int, backward: bool, sinks: torch.Tensor) -> dict:
    """FlashAttention-4's own `flash_attn_func`, plain and with the same softcap and sinks, called directly
    (B, S, H, D): what the library itself pays for them. Empty unless `provider` is flash and FA4 is here."""
    if provider != "flash" or shape.device != "cuda":
        return {}
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError:
        return {}
    q, k, v = (torch.randn(1, s, shape.h, shape.d, device="cuda", dtype=shape.dtype, requires_grad=backward)
               for _ in range(3))
    dout = torch.randn_like(q)

    def runner(**mods):
        def run():
            out = flash_attn_func(q, k, v, causal=True, **mods)
            out = out[0] if isinstance(out, tuple) else out
            if backward:
                out.backward(dout)
        return run

    return {"library plain": runner(), "library softcap": runner(softcap=30.0),
            "library sinks": runner(learnable_sink=sinks)}


class HaloLoopback:
    """A channel with no network (`RingSpec.channel_factory`), to run one rank's windowed ring alone: a K/V
    exchange hands back the runs the halo plan names, cut from their owners' shards before the timing starts (as
    the network would deliver them); a dK/dV exchange hands its receive buffers back unfilled (no other rank ran),
    so of a backward only this rank's dQ is meaningful."""

    def __init__(self, received: list[torch.Tensor]):
        self._received = received

    def __call__(self, group, timeout, stats):
        return self

    def post(self, sends, recvs, kind):
        return Received(self._received if kind == "kv" else [t for ts in recvs.values() for t in ts])


def halo_bytes(s: int, p: int, layout: str, band_, per_token: int) -> dict:
    """K/V bytes each rank sends forward under the halo plan, against the rotating ring's W - 1 shards."""
    from cpattn.cp.halo import halo_plan

    plan = halo_plan(s, p, layout, band_)
    sent = [sum(run.size for runs in plan.sends(r).values() for run in runs) * per_token for r in range(p)]
    dense = (p - 1) * (s // p) * per_token
    return {"kv_bytes_sent_per_rank": sent, "kv_bytes_sent_rotating_ring": dense,
            "kv_sent_max_over_rotating": max(sent) / dense, "peers_per_rank": [len(plan.sends(r)) for r in range(p)]}


def halo_split_case(provider: str, shape: Shape, s: int, p: int, w: int, layout: str, fuse: bool):
    """(whole, split, positions): one windowed call over the whole sequence, forward and backward, returning dQ;
    and all P ranks' windowed rings one after another, returning each rank's dQ."""
    import cpattn
    from cpattn.call import make_call
    from cpattn.cp.comm import CommStats
    from cpattn.cp.halo import _gather_runs, halo_backward, halo_forward, halo_plan, restricting_band
    from cpattn.cp.layout import ring_positions
    from cpattn.cp.mesh import Group
    from cpattn.cp.ring import RingSpec
    from cpattn.scoremods import as_kernel_call

    adapter = cpattn.get_provider(provider)
    q, k, v, dout = (shape.tensor(s) for _ in range(4))
    full = as_kernel_call(adapter, make_call(q, k, v, None, 0.0, True, None, False, window=(w - 1, 0)))

    def whole():
        out, lse = adapter.forward(full)
        return adapter.backward(full, dout, out, lse)[0]

    positions = [ring_positions(s, p, r, layout, shape.device) for r in range(p)]
    local = [tuple(t.index_select(2, i).contiguous() for t in (q, k, v, dout)) for i in positions]
    calls = [make_call(lq, lk, lv, None, 0.0, True, None, False, sharded=True, window=(w - 1, 0))
             for lq, lk, lv, _ in local]
    band_ = restricting_band(calls[0], s)
    plan = halo_plan(s, p, layout, band_)
    received = [[t for peer, runs in plan.receives(r).items()
                 for t in (_gather_runs(local[peer][1], runs), _gather_runs(local[peer][2], runs))]
                for r in range(p)]

    def split():
        grads = []
        for r in range(p):
            spec = RingSpec(Group(None, r, p, "loopback"), layout, s, None, CommStats(),
                            channel_factory=HaloLoopback(received[r]), fuse_halo=fuse)
            out, lse, kept = halo_forward(adapter, calls[r], spec, band_, shape.dtype)
            grads.append(halo_backward(adapter, calls[r], spec, band_, local[r][3], out, lse, shape.dtype,
                                       tuple(kept))[0])
        return grads

    return whole, split, positions, band_


def ring_section(args, shape: Shape) -> list[dict]:
    rows = []
    cases = [(p, layout, fuse) for p in args.parts for layout in args.layouts for fuse in args.halo]
    for p, layout, fuse in common.progress(cases, "windowed ring split", not args.quiet):
        row = {"provider": args.ring_provider, "S": args.ring_seq, "P": p, "window": args.ring_window,
               "layout": layout, "halo": fuse}
        try:
            whole, split, positions, band_ = halo_split_case(args.ring_provider, shape, args.ring_seq, p,
                                                             args.ring_window, layout, fuse == "fused")
            per_token = 2 * shape.h * shape.d * torch.finfo(shape.dtype).bits // 8
            row.update(halo_bytes(args.ring_seq, p, layout, band_, per_token))
            full = whole()
            row["max_diff_vs_whole"] = max((full.index_select(2, i).double() - g.double()).abs().max().item()
                                           for i, g in zip(positions, split()))
            times = common.bench_alternating({"whole": whole, "split": split}, shape.device, args.rounds,
                                             cpu_seconds=0.02 if args.smoke else 0.2)
            row["whole"], row["split"] = times["whole"], times["split"]
            row["efficiency"] = row["whole"]["median_ms"] / row["split"]["median_ms"]
            row["round_efficiencies"] = [a / b for a, b in zip(times["whole"]["round_medians_ms"],
                                                               times["split"]["round_medians_ms"])]
            row["split_host_ms"] = common.host_ms(split, shape.device, repeats=2 if args.smoke else 5)
        except Exception as exc:
            row["error"] = common.error_text(exc)
        rows.append(row)
    return rows


def summary_lines(payload: dict) -> list[str]:
    out = []
    for r in payload.get("kernels", []):
        what = f"kernels {r['provider']} {r['direction']} window={r['window']}"
        out.append(f"{what}: {r['error']}" if "error" in r else
                   f"{what}: {r['median_ms']:.3f} ms" + (f", vs causal {r['vs_causal']:.3f}" if "vs_causal" in r
                                                        else ""))
    for r in payload.get("overhead", []):
        what = f"overhead {r['provider']} S={r['S']} {r['direction']}"
        out.append(f"{what}: {r['error']}" if "error" in r else what + ": " + ", ".join(
            f"{n} {r[n]['overhead'] * 100:+.2f}%" for n in r if isinstance(r[n], dict) and "overhead" in r[n]))
    for r in payload.get("ring", []):
        what = f"ring {r['provider']} S={r['S']} P={r['P']} window={r['window']} {r['layout']} {r.get('halo')}"
        out.append(f"{what}: {r['error']}" if "error" in r else
                   f"{what}: efficiency {r['efficiency']:.3f}, K/V sent (max) {r['kv_sent_max_over_rotating']:.3f} "
                   f"of the rotating ring's, dQ diff {r['max_diff_vs_whole']:.2e}")
    return out


def plot(payload: dict, path: str) -> str | None:
    plt = common.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for provider in sorted({r["provider"] for r in payload.get("kernels", [])}):
        for direction, style in (("fwd", "--"), ("fwd+bwd", "-")):
            pts = [(r["window"], r["median_ms"]) for r in payload["kernels"] if r["provider"] == provider
                   and r["direction"] == direction and r["window"] is not None and "median_ms" in r]
            if pts:
                axes[0].plot(*zip(*pts), style, marker="o", label=common.legend_label(f"{provider} {direction}"))
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("window w (causal, w - 1 keys back)")
    axes[0].set_ylabel("ms per call")
    axes[0].legend(fontsize=7)
    rows = [r for r in payload.get("overhead", []) if "error" not in r]
    names = ("softcap", "sinks", "softcap+sinks")
    for i, name in enumerate(names):
        axes[1].bar([j + 0.25 * i for j in range(len(rows))], [100 * r[name]["overhead"] for r in rows], 0.25,
                    label=name)
    axes[1].set_xticks([j + 0.25 for j in range(len(rows))])
    axes[1].set_xticklabels([f"S={r['S']} {r['direction']}" for r in rows], fontsize=7)
    axes[1].set_ylabel("overhead over the plain call (%)")
    axes[1].axhline(3, color="r", lw=0.8)
    axes[1].legend(fontsize=7)
    ring = [r for r in payload.get("ring", []) if "efficiency" in r]
    axes[2].bar(range(len(ring)), [r["efficiency"] for r in ring])
    axes[2].set_xticks(range(len(ring)))
    axes[2].set_xticklabels([f"P={r['P']} {r['layout']} {r.get('halo')}" for r in ring], fontsize=7)
    axes[2].set_ylabel("whole windowed call / windowed ring split")
    axes[2].axhline(0.95, color="r", lw=0.8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"windows, softcaps and sinks: {payload['device']}")
    return common.save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when a GPU is present")
    parser.add_argument("--sections", nargs="*", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--providers", nargs="*", help="kernels section (default: flash flex _native_cudnn)")
    parser.add_argument("--seq", type=int, default=65536, help="kernels section's S")
    parser.add_argument("--windows", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--overhead-provider", default="flash")
    parser.add_argument("--overhead-seqs", type=int, nargs="*", default=[16384, 65536])
    parser.add_argument("--library", action=argparse.BooleanOptionalAction, default=True,
                        help="overhead section: also FA4's own flash_attn_func with and without them")
    parser.add_argument("--ring-provider", default="flash")
    parser.add_argument("--ring-seq", type=int, default=131072)
    parser.add_argument("--ring-window", type=int, default=4096)
    parser.add_argument("--parts", type=int, nargs="*", default=[8])
    parser.add_argument("--layouts", nargs="*", choices=("zigzag", "contiguous"), default=["zigzag", "contiguous"])
    parser.add_argument("--halo", nargs="*", choices=("fused", "separate"), default=["fused", "separate"],
                        help="ring section: each query chunk as one call on its keys laid end to end (fused, "
                             "RingSpec.fuse_halo), or one call per run of keys, merged (separate)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="balanced rounds per timing of the ring section")
    parser.add_argument("--smoke", action="store_true", help="CPU-sized shapes and short timings")
    common.add_output_arguments(parser)
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here")
    if args.smoke:
        args.heads, args.head_dim, args.rounds = 2, 16, min(args.rounds, 2)
        args.seq, args.windows, args.overhead_seqs = 256, [16, 64], [128]
        args.ring_seq, args.ring_window, args.parts = 256, 24, [4]
        if device == "cpu":
            args.providers = args.providers or ["native", "_native_math"]
            args.overhead_provider = args.ring_provider = "_native_math"
    args.providers = args.providers or ["flash", "flex", "_native_cudnn"]
    shape = Shape(device, args.heads, args.head_dim)
    label = common.device_name(device)
    payload = {"suite": "score_mods", "device": label, "environment": common.environment(),
               "shape": {"B": 1, "H": args.heads, "D": args.head_dim, "dtype": str(shape.dtype).replace("torch.", "")}}
    sections = {"kernels": kernels_section, "overhead": overhead_section, "ring": ring_section}
    for name in args.sections:
        payload[name] = sections[name](args, shape)
    for line in summary_lines(payload):
        print(line, flush=True)
    path = common.write_results(common.results_path("score_mods", label, args.out, args.tag), payload)
    png = None if args.no_plot else plot(payload, path)
    print(f"wrote {path}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
