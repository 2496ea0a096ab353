"""Is FlashAttention-4's forward faster when the head dim is zero-padded to a wider multiple?

    python benchmarks/head_dim_pad_probe.py [--dims 104 112 120] [--seqs 4096 16384] [--out DIR]

FA4's sm90 forward picks its tile by head dim: up to 96 wide tiles, 97 to 128 the 128-wide kernel. cpattn pads
head dims to a multiple of 8 for the forward (32 when the sm90 backward runs), so a forward-only call at 104
runs at 104. The auto suite measured it 0.66 to 0.72 of cuDNN there. This probe times the library's own forward
(`flash_attn.cute.flash_attn_func`) on (B, S, H, D) bf16 tensors at the head dim as given and zero-padded to
multiples of 16, 32 and 64 (zero q/k columns change no score, zero v columns are sliced off), against cuDNN
through SDPA, causal and not, B*H*S = 16 * 16384 tokens. Timing: triton.testing.do_bench medians.
Writes head_dim_pad_probe<tag>.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.run import RESULTS, write_cases  # noqa: E402
from cpattn.providers.flash import _align_head_dim as padded  # noqa: E402  the zero padding cpattn itself uses


def probe(d: int, s: int, causal: bool, tokens: int) -> dict:
    from flash_attn.cute import flash_attn_func
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    h = 16
    b = max(1, tokens // (h * s))
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    row = {"D": d, "S": s, "B": b, "H": h, "causal": causal, "ms": {}}
    reference = None
    for multiple in (8, 16, 32, 64):
        qp, kp, vp = (padded(t, multiple) for t in (q, k, v))
        width = qp.shape[-1]
        if f"fa4_d{width}" in row["ms"]:
            continue

        def fa4():
            out = flash_attn_func(qp, kp, vp, softmax_scale=d ** -0.5, causal=causal)
            return (out[0] if isinstance(out, tuple) else out)[..., :d]
        result = fa4()
        reference = result if reference is None else reference
        row.setdefault("max_abs_diff_vs_unpadded", {})[f"d{width}"] = (result.float() - reference.float()).abs().max().item()
        row["ms"][f"fa4_d{width}"] = do_bench(fa4, warmup=50, rep=300)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    row["ms"]["cudnn"] = do_bench(cudnn, warmup=50, rep=300)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="*", default=[104, 112, 120])
    parser.add_argument("--seqs", type=int, nargs="*", default=[4096, 16384])
    parser.add_argument("--tokens", type=int, default=16 * 16384)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    rows = []
    for d in args.dims:
        for s in args.seqs:
            for causal in (False, True):
                try:
                    rows.append(probe(d, s, causal, args.tokens))
                except Exception as exc:  # record, keep going
                    rows.append({"D": d, "S": s, "causal": causal, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                print(rows[-1], flush=True)
    print("wrote", write_cases(args.out, f"head_dim_pad_probe{args.tag}", rows))


if __name__ == "__main__":
    main()
