"""On an sm90 GPU with flash-attn-4: the packed ring's one dQ accumulator per rank (SharedVarlenRows of
cpattn/packed_varlen.py over fa4_sm90_backward.SharedVarlenAccumulator) against each chain's own varlen backward.

    CPATTN_FA4_FAST_PATHS=force python tests/gpu/shared_varlen_check.py [--out DIR] [--tag TAG]

(force: the accumulator runs by default only on releases in fa4_release_window.SHARED_VARLEN_CHECKED_RELEASES,
which this check is for.)

Streams of log-normal document lengths sharded by documents (cpattn.packed.packed_layout), bf16, causal. For
every rank, its packed ring forward (the other ranks' key blocks from a loopback, as benchmarks/packed_ring.py
runs it) gives the global out and lse; then every chain of every step runs both ways: dK and dV of the shared
path must equal the chain's own backward bit for bit (the same main kernel on the same rows and statistics), and
the rank's dQ (one float32 accumulator, rounded once) must be within two rounding steps of bf16 at its largest
value of the sum of the added chains' own dQ (each rounded, then summed in float32). Also recorded: how many chains
added into the accumulator and how many ran their own backward, and the rank's dQ from the packed ring (which
takes the shared path) against one varlen call over the whole stream. Exit 1 on any failure; writes
shared_varlen_check<TAG>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests", "support"))

import cpattn  # noqa: E402
from benchmarks.packed_ring import Loopback, lognormal_bounds, loopback_blocks  # noqa: E402
from cpattn.cp.comm import CommStats  # noqa: E402
from cpattn.cp.mesh import Group  # noqa: E402
from cpattn.cp.packed_plan import Chain, Piece, step_plan  # noqa: E402
from cpattn.cp.packed_ring import PackedRingSpec, packed_ring_backward, packed_ring_forward  # noqa: E402
from cpattn.packed import block_kernel, packed_layout, packed_view  # noqa: E402

CASES = [  # (S, P, mean, sigma, heads, head dim)
    (32768, 4, 2048, 1.0, 8, 128),
    (65536, 8, 4096, 1.5, 8, 128),
    (32768, 3, 2048, 1.0, 4, 64),
]


def check_case(s, p, mean, sigma, heads, d, seed=0) -> dict:
    torch.manual_seed(seed)
    bounds = lognormal_bounds(s, mean, sigma, seed)
    layout = packed_layout(bounds, p)
    q, k, v, dout = (torch.randn(s, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    kernel, _, reasons = block_kernel(cpattn.get_provider("flash_varlen"), packed_view(q, k, v, True, None))
    assert not reasons, reasons
    positions = [torch.tensor(layout.positions(r), dtype=torch.long, device="cuda") for r in range(p)]
    local = [tuple(t.index_select(0, i) for t in (q, k, v, dout)) for i in positions]
    blocks = loopback_blocks([(lk, lv) for _, lk, lv, _ in local], layout, True)
    whole = Chain(0, s, 0, s, True, tuple(Piece(a, b, a, b, True) for a, b in zip(bounds, bounds[1:]) if b > a))
    out_w, lse_w = kernel.forward(q, k, v, whole)
    dq_whole = kernel.backward(dout, q, k, v, out_w, lse_w, whole)[0]
    row = {"S": s, "P": p, "mean": mean, "sigma": sigma, "heads": heads, "D": d, "ranks": [], "failures": []}
    for r in range(p):
        lq, lk, lv, ldo = local[r]
        spec = PackedRingSpec(Group(None, r, p, "loopback"), layout, True, None, CommStats(),
                              channel_factory=Loopback(), block_source=blocks)
        out, lse, last = packed_ring_forward(kernel, spec, lq, lk, lv)
        frame = step_plan(layout, r, r, True).chains[0]
        shared = kernel.shared_rows(ldo, lq, out, lse, frame)
        if shared is None:
            row["failures"].append(f"rank {r}: no shared accumulator")
            continue
        own_dq = torch.zeros(lq.shape, dtype=torch.float32, device="cuda")
        added = refused = 0
        for step in range(p):
            plan = step_plan(layout, r, (r - step) % p, True)
            if plan is None:
                continue
            if step == 0:  # the rank's own keys
                (a, b), = plan.kv
                kb, vb = lk[a:b], lv[a:b]
            else:
                kb, vb = blocks(r, (r - step) % p)
            for c in plan.chains:
                rows = slice(c.q0, c.q1)
                dq_c, dk_c, dv_c = kernel.backward(ldo[rows], lq[rows], kb[c.k0:c.k1], vb[c.k0:c.k1], out[rows],
                                                   lse[:, rows], c)
                grads = shared.backward(kb[c.k0:c.k1], vb[c.k0:c.k1], c)
                if grads is None:  # runs its own backward in the ring: not in the accumulator
                    refused += 1
                    continue
                added += 1
                own_dq[rows] += dq_c.float()
                for name, got, want in (("dk", grads[0], dk_c), ("dv", grads[1], dv_c)):
                    if not torch.equal(got, want):
                        diff = (got.float() - want.float()).abs().max().item()
                        row["failures"].append(f"rank {r} step {step}: {name} differs by {diff:.3e}")
        dq_shared = shared.dq().float() if added else None
        scale = own_dq.abs().max().item()
        dq_diff = (dq_shared - own_dq).abs().max().item() if dq_shared is not None else None
        bound = 2 * scale * 2.0 ** -8
        if dq_diff is not None and dq_diff > bound:
            row["failures"].append(f"rank {r}: dQ differs by {dq_diff:.3e} (bound {bound:.3e})")
        ring_dq = packed_ring_backward(kernel, spec, lq, lk, lv, ldo, out, lse, last)[0]
        vs_whole = (ring_dq.float() - dq_whole.index_select(0, positions[r]).float()).abs().max().item()
        row["ranks"].append({"rank": r, "rows": lq.shape[0], "chains_added": added, "chains_refused": refused,
                             "dq_max": scale, "dq_diff_vs_own": dq_diff, "dq_bound": bound,
                             "ring_dq_diff_vs_whole": vs_whole})
        print(f"  rank {r}: {added} chains added, {refused} refused, dQ diff {dq_diff}, "
              f"ring dQ vs whole {vs_whole:.2e}", file=sys.stderr, flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    from cpattn.providers.flash.fa4 import fast_path_status

    status = str(fast_path_status(cpattn.get_provider("flash_varlen")))
    rows, failures = [], 0
    for case in CASES:
        print(f"case {case}", file=sys.stderr, flush=True)
        row = check_case(*case)
        rows.append(row)
        failures += len(row["failures"])
        print(f"{case}: {'ok' if not row['failures'] else row['failures']}", flush=True)
    payload = {"device": torch.cuda.get_device_name(), "fast_paths": status, "cases": rows,
               "failures": failures}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"shared_varlen_check{args.tag}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"{sum(len(r['ranks']) for r in rows)} ranks checked, {failures} failures; wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
