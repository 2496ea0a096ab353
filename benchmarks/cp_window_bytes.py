"""Bytes each rank sends per attention layer under ring context parallelism: a sliding-window layer against a
dense causal one (CPU, gloo).

    python benchmarks/cp_window_bytes.py
    python benchmarks/cp_window_bytes.py --worlds 2 4 8 --tokens-per-rank 512 --window 128

For each world size W, W gloo ranks are spawned on this machine; every rank runs the same layer shapes
through cpattn.attention_dispatch under cp_strategy='ring', forward then backward, and reads what it sent from
its ContextParallel's counters (CommStats: `kv_bytes` forward, `dkv_bytes` and the backward's `kv_bytes`
backward; per peer for the windowed exchange). Layers:
  dense      causal, no window: the rotating ring (W - 1 KV shards forward, W - 2 more and W - 1 dK/dV parts
             backward).
  window     causal, window=(w - 1, 0) (transformers' sliding_window=w): the windowed exchange
             (cpattn/cp/halo.py), which sends only the keys in reach to the ranks in reach.
Both layouts (zigzag, contiguous) are measured. The JSON records every rank's bytes and peers; the summary
gives the most any rank sent, in bytes, in windows (w keys of K and V) and in shards (a rank's K and V).
Bytes do not depend on the machine: this runs on CPU.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import common  # noqa: E402

SUITE = "cp_window_bytes"
LAYOUTS = ("zigzag", "contiguous")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8],
                        help="world sizes W to spawn (default: %(default)s)")
    parser.add_argument("--tokens-per-rank", type=int, default=256, help="sequence length / W (default: %(default)s)")
    parser.add_argument("--window", type=int, default=64,
                        help="sliding window w: window=(w - 1, 0), causal (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8, help="query heads (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per world size (default: %(default)s)")
    common.add_output_arguments(parser)
    return parser.parse_args(argv)


def _layer_bytes(args, mesh, layout: str, window) -> dict:
    """One layer's forward and backward on this rank: bytes sent (total and per peer) in each pass."""
    import cpattn

    total = args.tokens_per_rank * mesh.size()
    gen = torch.Generator().manual_seed(0)  # the same problem on every rank
    dtype = getattr(torch, args.dtype)
    make = lambda h: torch.randn(args.batch, h, total, args.head_dim, generator=gen)  # noqa: E731
    q, k, v, dout = make(args.heads), make(args.kv_heads), make(args.kv_heads), make(args.heads)
    local = [cpattn.shard_sequence(t, mesh, 2, layout).to(dtype) for t in (q, k, v, dout)]
    q, k, v = (t.requires_grad_() for t in local[:3])
    with cpattn.attention_provider("native", cp_mesh=mesh, cp_strategy="ring", cp_layout=layout) as state:
        out = cpattn.attention_dispatch(q, k, v, is_causal=True, enable_gqa=args.heads != args.kv_heads,
                                        window=window)
        forward = dict(state.cp.stats)
        out.backward(local[3])
        both = dict(state.cp.stats)
    backward = {key: both[key] - forward.get(key, 0) for key in both}
    return {"forward": _sent(forward), "backward": _sent(backward), "finite": bool(torch.isfinite(out).all())}


def _sent(stats: dict) -> dict:
    """Bytes sent, and per peer (the windowed exchange counts them per peer; the rotating ring's peers are its
    neighbours and every block's owner, not counted apart)."""
    peers = {}
    for key, value in stats.items():
        if "_bytes_to_" in key:
            peer = int(key.rsplit("_", 1)[1])
            peers[peer] = peers.get(peer, 0) + value
    return {"bytes": sum(v for k, v in stats.items() if k.endswith("_bytes")), "peers": peers}


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    try:
        for layout in LAYOUTS:
            for layer, window in (("dense", None), ("window", (args.window - 1, 0))):
                queue.put((rank, layout, layer, _layer_bytes(args, mesh, layout, window)))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_world(args, world: int) -> list[dict]:
    """Spawn `world` ranks; one row per (layout, layer) with every rank's bytes."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    expected, got, deadline = world * 2 * len(LAYOUTS), {}, time.monotonic() + args.timeout
    while len(got) < expected and time.monotonic() < deadline:
        if queue.empty():
            if not any(p.is_alive() for p in procs):
                break
            time.sleep(0.05)
            continue
        rank, layout, layer, report = queue.get()
        got[(layout, layer, rank)] = report
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    if len(got) < expected:
        raise RuntimeError(f"W={world}: {len(got)} of {expected} reports came back")
    return [_row(args, world, layout, layer, [got[(layout, layer, r)] for r in range(world)])
            for layout in LAYOUTS for layer in ("dense", "window")]


def _row(args, world: int, layout: str, layer: str, ranks: list[dict]) -> dict:
    element = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    token = args.batch * args.kv_heads * args.head_dim * element
    kv_token = 2 * token  # a key and its value
    shard = args.tokens_per_rank * kv_token
    window = args.window * kv_token
    forward = [r["forward"]["bytes"] for r in ranks]
    backward = [r["backward"]["bytes"] for r in ranks]
    return {
        "world": world, "layout": layout, "layer": layer, "window": None if layer == "dense" else args.window,
        "forward_bytes": forward, "backward_bytes": backward,
        "forward_peers": [sorted(r["forward"]["peers"]) for r in ranks],
        "max_forward_bytes": max(forward), "max_backward_bytes": max(backward),
        "max_forward_windows": round(max(forward) / window, 3), "max_forward_shards": round(max(forward) / shard, 3),
        "max_backward_windows": round(max(backward) / window, 3),
        "max_backward_shards": round(max(backward) / shard, 3),
        "outputs_finite": all(r["finite"] for r in ranks),
    }


def plot(rows: list[dict], path: str) -> str | None:
    plt = common.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    lines = [("window", layout, "--s", f"window ({layout})") for layout in LAYOUTS]
    dense = {layout: [r["max_forward_bytes"] for r in rows if r["layout"] == layout and r["layer"] == "dense"]
             for layout in LAYOUTS}
    if all(bytes_ == dense[LAYOUTS[0]] for bytes_ in dense.values()):  # the rotation moves the same either way
        lines.insert(0, ("dense", LAYOUTS[0], "-o", "dense (either layout)"))
    else:
        lines[:0] = [("dense", layout, "-o", f"dense ({layout})") for layout in LAYOUTS]
    for ax, which in zip(axes, ("forward", "backward")):
        for layer, layout, style, label in lines:
            sel = [r for r in rows if r["layout"] == layout and r["layer"] == layer]
            ax.plot([r["world"] for r in sel], [r[f"max_{which}_bytes"] / 2**10 for r in sel], style, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("ranks W")
        ax.set_title(f"{which}: KiB the busiest rank sends per layer")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("KiB")
    axes[0].legend()
    return common.save_figure(fig, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    rows = []
    for world in common.progress(args.worlds, "world sizes", not args.quiet):
        rows += measure_world(args, world)
    for r in rows:
        print(f"W={r['world']} {r['layout']:10} {r['layer']:6} forward {r['max_forward_bytes']:>9} B "
              f"({r['max_forward_windows']:.2f} windows, {r['max_forward_shards']:.2f} shards)  backward "
              f"{r['max_backward_bytes']:>9} B ({r['max_backward_windows']:.2f} windows, "
              f"{r['max_backward_shards']:.2f} shards)")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "tag", "no_plot", "quiet", "timeout")}
    payload = {"suite": SUITE, "environment": common.environment(), "config": config, "results": rows}
    path = common.write_results(common.results_path(SUITE, "cpu", args.out, args.tag), payload)
    print(path)
    if not args.no_plot:
        png = plot(rows, path)
        if png:
            print(png)
    return payload


if __name__ == "__main__":
    main()
