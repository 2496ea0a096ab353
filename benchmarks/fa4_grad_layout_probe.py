"""FA4's gradients by input layout and head dim, against float64: which combination is wrong, and whose doing.

    python benchmarks/fa4_grad_layout_probe.py [--out benchmarks/results]

benchmarks/gpu_fuzz.py found `auto` (which ran FA4) with wrong dQ/dK/dV (off by 0.3 to 1.3, outputs right) at
head dim 80 when q, k, v were (B, H, S, D) views of (B, S, H, D) storage. Here each head dim and layout runs
four ways on the same values: through cpattn's `flash` provider; through flash_attn.cute.flash_attn_func on
the (B, S, H, D) tensors with dO as the transpose view autograd hands over; the same with a contiguous dO; and
the same with every input contiguous. Writes fa4_grad_layout_probe.json with each way's worst gradient error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import cpattn  # noqa: E402
from helpers import reference_with_grads  # noqa: E402


def grad_errors(grads, ref_grads) -> float:
    return max((g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads))


def probe(d: int, layout: str, causal: bool, b=2, hq=2, hkv=1, s=1760) -> dict:
    from flash_attn.cute import flash_attn_func

    gen = torch.Generator().manual_seed(d)
    base = [torch.randn(b, h, s, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv)]
    dout = torch.randn(b, hq, s, d, generator=gen, dtype=torch.float64)
    if layout == "bshd_view":  # (B, H, S, D) views of (B, S, H, D) storage
        q, k, v = (x.transpose(1, 2).contiguous().cuda().bfloat16().transpose(1, 2) for x in base)
    else:
        q, k, v = (x.cuda().bfloat16() for x in base)
    dout = dout.cuda()
    _, _, ref = reference_with_grads(q, k, v, dout, None, causal)
    row = {"head_dim": d, "layout": layout, "causal": causal, "shape": [b, hq, hkv, s]}

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with cpattn.attention_provider("flash"):
        cpattn.attention_dispatch(*leaves, is_causal=causal, enable_gqa=hq != hkv).backward(dout.bfloat16())
    row["cpattn_flash"] = grad_errors([t.grad for t in leaves], ref)

    def public(dout_contiguous: bool, inputs_contiguous: bool) -> float:
        leaves = [t.detach().transpose(1, 2) for t in (q, k, v)]  # (B, S, H, D)
        if inputs_contiguous:
            leaves = [t.contiguous() for t in leaves]
        leaves = [t.requires_grad_() for t in leaves]
        out = flash_attn_func(*leaves, causal=causal)
        out = out[0] if isinstance(out, tuple) else out
        g = dout.bfloat16().transpose(1, 2)
        out.backward(g.contiguous() if dout_contiguous else g)
        return grad_errors([t.grad.transpose(1, 2) for t in leaves], ref)
    row["public_dout_view"] = public(False, False)
    row["public_dout_contiguous"] = public(True, False)
    row["public_all_contiguous"] = public(True, True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dims", type=int, nargs="*", default=[64, 80, 96, 128])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    rows = []
    for d in args.head_dims:
        for layout in ("bshd_view", "bhsd"):
            for causal, shape in ((False, (2, 2, 1, 1760)), (True, (2, 2, 1, 1760)), (True, (2, 2, 2, 97))):
                try:
                    row = probe(d, layout, causal, *shape)
                except Exception as exc:
                    row = {"head_dim": d, "layout": layout, "causal": causal, "error": f"{type(exc).__name__}: {exc}"[:400]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"fa4_grad_layout_probe{args.tag}.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
