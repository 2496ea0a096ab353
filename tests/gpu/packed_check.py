"""On one GPU: packed documents with windows, softcaps and sinks through the real varlen kernels, on one device
and under the packed ring (ranks over gloo on this GPU), forward and backward, against float64.

    python tests/gpu/packed_check.py [--out benchmarks/results] [--tag TAG] [--worlds 1 2 3]
                                     [--providers flash_varlen flash] [--apis allgather] [--meshes 2x2]

A stream of documents of lengths 0, 1, shorter than a shard, longer than S / W and crossing every shard boundary
(bf16, Hq 8, Hkv 2, D 64; also Hq = Hkv = 4) runs `cpattn.packed_attention` (and, at W = 1,
`cpattn.flash_varlen_attention`; at W > 1 on `flash_varlen`, also `packed_attention` under cp_strategy="allgather";
with --meshes, `packed_attention` on 2-D (ring, ulysses) meshes: the hybrid schedule)
with: nothing, a causal window, a two-sided window, (0, 0), a window wider
than every document, a softcap, sinks, and a causal window with softcap and sinks. Each rank's shard comes from
`shard_packed`, its position ids (checked against the layout) from `packed_position_ids`; outputs and q/k/v/sink
gradients are gathered (`gather_packed`; the sinks' shares summed) and
compared with `documents_reference`, one float64 reference call per document. A provider that refuses the
backward on this GPU (an FA4 release whose sm90 backward takes no cu_seqlens) runs the forward, and the refusal
is recorded with it. Writes
packed_check_<gpu><tag>.json and prints a summary; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests", "support"))

BOUNDS = (0, 1, 37, 37, 40, 300, 301, 333, 700, 702, 1024)  # one empty document
MODS = {
    "plain": {},
    "causal window": dict(window=(63, 0)),
    "two-sided window": dict(window=(16, 24), causal=False),
    "window (0, 0)": dict(window=(0, 0)),
    "window wider than every document": dict(window=(5000, 0)),
    "softcap": dict(softcap=20.0),
    "sinks": dict(sinks=True),
    "window + softcap + sinks": dict(window=(47, 0), softcap=15.0, sinks=True),
}
HEADS = ((8, 2, 64), (4, 4, 128))
DEVICE = "cuda"  # --device cpu: the same cases on CPU providers, to check the script itself
OUT_TOL, GRAD_TOL = 2e-2, 5e-2  # bf16, relative to max(1, |reference|)


def _problem(heads, seed: int):
    hq, hkv, d = heads
    gen = torch.Generator().manual_seed(seed)
    total = BOUNDS[-1]
    return tuple(torch.randn((total, h, d), generator=gen, dtype=torch.float64).to(torch.bfloat16).double()
                 for h in (hq, hkv, hkv, hq))


def _case(name: str, mods: dict, heads, api: str, mesh, provider: str, grad: bool = True) -> dict:
    import torch.distributed as dist

    import cpattn
    from cp_harness import documents_reference

    causal = mods.get("causal", True)
    q, k, v, dout = _problem(heads, 0)
    gen = torch.Generator().manual_seed(1)
    sinks = (2.0 * torch.randn(heads[0], generator=gen, dtype=torch.float64)).to(torch.bfloat16).double() \
        if mods.get("sinks") else None
    cu = torch.tensor(BOUNDS, dtype=torch.int32, device=DEVICE)
    world = 1 if mesh is None else dist.get_world_size()
    shard = (lambda t: t) if world == 1 else (lambda t: cpattn.shard_packed(t, cu, mesh))
    to_gpu = lambda t: shard(t.to(DEVICE).to(torch.bfloat16)).detach().requires_grad_(grad)  # noqa: E731
    ql, kl, vl = (to_gpu(t) for t in (q, k, v))
    sink_leaf = None if sinks is None else sinks.to(DEVICE).float().requires_grad_(grad)
    positions = cpattn.packed.packed_position_ids(cu, None if world == 1 else mesh, DEVICE)  # checked on DEVICE
    kw = dict(is_causal=causal, window=mods.get("window"), softcap=mods.get("softcap"), sinks=sink_leaf,
              position_ids=positions)
    longest = max(b - a for a, b in zip(BOUNDS, BOUNDS[1:]))
    options = {} if mesh is None else dict(cp_mesh=mesh, cp_timeout=60)
    if api == "allgather":  # the same document shards through all-gather's varlen calls
        options["cp_strategy"] = "allgather"
    with cpattn.attention_provider(provider, **options):
        if api == "flash_varlen_attention":
            out = cpattn.flash_varlen_attention(ql, kl, vl, cu, cu, longest, longest, **kw)
        else:
            out = cpattn.packed_attention(ql, kl, vl, cu, **kw)
        if grad:
            out.backward(shard(dout.to(DEVICE).to(torch.bfloat16)))
    gather = (lambda t: t.double().cpu()) if world == 1 else (lambda t: cpattn.gather_packed(t, cu, mesh).double().cpu())
    ref_out, ref_grads, ref_dsinks = documents_reference(q, k, v, dout, list(BOUNDS), causal, mods.get("window"),
                                                         mods.get("softcap"), sinks)
    scale = lambda ref: max(1.0, ref.abs().max().item())  # noqa: E731
    errors = {"out": (gather(out.detach()) - ref_out).abs().max().item() / scale(ref_out)}
    for grad_name, local, ref in zip(("dq", "dk", "dv"), (ql, kl, vl), ref_grads if grad else ()):
        errors[grad_name] = (gather(local.grad) - ref).abs().max().item() / scale(ref)
    if sink_leaf is not None and grad:
        dsinks = sink_leaf.grad.clone()
        if world > 1:
            dist.all_reduce(dsinks)
        errors["dsinks"] = (dsinks.double().cpu() - ref_dsinks).abs().max().item() / scale(ref_dsinks)
    ok = errors["out"] <= OUT_TOL and all(v <= GRAD_TOL for n, v in errors.items() if n != "out")
    return {"case": name, "api": api, "heads": heads, "world": world, "errors": errors, "backward": grad,
            "status": "pass" if ok else "fail"}


def _cases(mesh, provider: str, only: list[str] | None = None) -> list[dict]:
    import cpattn

    # flash_varlen_attention always runs flash_varlen: checked once, with that provider, on one device
    # and all-gather over document shards (cp_strategy="allgather") on the varlen kernels, under CP
    apis = ["packed_attention"] + (["flash_varlen_attention"] if mesh is None and provider == "flash_varlen" else [])
    flat = mesh is not None and getattr(mesh, "ndim", 1) == 1  # all-gather runs on a 1-D mesh only
    apis += ["allgather"] if flat and provider == "flash_varlen" else []
    apis = [api for api in apis if only is None or api in only]
    out = []
    for heads in HEADS:
        for api in apis:
            for name, mods in MODS.items():
                start = time.monotonic()
                try:
                    try:
                        row = _case(name, mods, heads, api, mesh, provider)
                    except cpattn.UnsupportedInputError as exc:  # a provider without a backward here: forward
                        row = _case(name, mods, heads, api, mesh, provider, grad=False)
                        row["backward_refused"] = str(exc)[:300]
                except Exception as exc:  # recorded as a failure: the provider claims these calls
                    row = {"case": name, "api": api, "heads": heads, "status": "fail",
                           "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
                row["seconds"] = time.monotonic() - start
                out.append(row)
                # one line per case as it ends: a run cut short by a time limit still shows how far it got
                shape = "1" if mesh is None else "x".join(map(str, getattr(mesh, "shape", (mesh.size(),))))
                print(f"{provider} W={shape} {api} {heads} {name}: {row['status']} "
                      f"({row['seconds']:.1f} s)", file=sys.stderr, flush=True)
    return out


def ranked(rank, world, payload):
    import torch.distributed as dist

    global DEVICE
    provider, DEVICE, only, shape = payload
    if DEVICE == "cuda":
        torch.cuda.set_device(0)
    mesh = dist.group.WORLD
    if shape is not None:  # the hybrid schedule: a (ring, ulysses) mesh of gloo groups (tensors stay on DEVICE)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("ring", "ulysses"))
    return _cases(mesh, provider, only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--worlds", type=int, nargs="*", default=[1, 2, 3])
    parser.add_argument("--providers", nargs="*", default=["flash_varlen", "flash"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--apis", nargs="*", default=None,
                        help="only these of packed_attention, flash_varlen_attention, allgather (default: all)")
    parser.add_argument("--meshes", nargs="*", default=[],
                        help="2-D (ring x ulysses) meshes for the hybrid schedule, e.g. 2x2 (after the worlds)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    from benchmarks.common import device_name, environment, results_path, write_results
    from reliability_helpers import run_ranks

    rows = []
    shapes = [None] * len(args.worlds) + [tuple(int(n) for n in m.split("x")) for m in args.meshes]
    worlds = list(args.worlds) + [r * u for r, u in shapes[len(args.worlds):]]
    for provider, world, shape in ((p, w, m) for p in args.providers for w, m in zip(worlds, shapes)):
        if world == 1 and shape is None:
            rows += [dict(r, provider=provider) for r in _cases(None, provider, args.apis)]
            continue
        result = run_ranks(world, ranked, (provider, DEVICE, args.apis, shape), timeout=400)
        broken = [r for r in result.ranks if r.error or r.killed]
        mesh = {} if shape is None else {"mesh": "x".join(map(str, shape))}
        if broken:
            rows.append({"provider": provider, "world": world, **mesh, "status": "fail",
                         "error": "; ".join(f"rank {r.rank}: {r.error or 'killed'}" for r in broken)[:800]})
        else:
            rows += [dict(r, world=world, provider=provider, **mesh) for r in result[0].value]
    label = device_name(DEVICE)
    fails = [r for r in rows if r["status"] != "pass"]
    path = write_results(results_path("packed_check", label, args.out, args.tag),
                         {"device": label, "environment": environment(), "providers": args.providers,
                          "bounds": BOUNDS, "tolerances": {"out": OUT_TOL, "grad": GRAD_TOL}, "cases": rows})
    for r in fails:
        print("FAIL", r)
    print(f"packed_check: {len(rows)} cases, {len(rows) - len(fails)} pass, {len(fails)} fail; wrote {path}")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
