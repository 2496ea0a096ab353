"""sageattention 1.0.6's causal Triton kernel with NaN, Inf or 0 placed right after its K-scale tensor.

    python benchmarks/sage_v1_probe.py   (on a GPU with sageattention 1.0.6; writes sage_v1_kscale_probe.json to $OUT)

Shows the out-of-bounds read that cpattn's sage adapters pad around (cpattn.providers.sage.v1_causal_padding):
for sequence lengths whose last 128-query block holds at most 64 rows, the last (batch, head) comes out NaN
when the memory after the scales holds NaN or Inf, and finite when it holds 0; other lengths are unaffected.
"""
import json, os, torch
from sageattention.quant_per_block import per_block_int8
from sageattention.attn_qk_int8_per_block_causal import forward as attn_true

res = {}
for s in (24, 64, 100, 128, 192):
    q, k, v = (torch.randn(2, 4, s, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    q8, qs, k8, ks = per_block_int8(q, k, tensor_layout="HND")
    row = {}
    for fill in ("nan", "inf", "zero"):
        value = {"nan": float("nan"), "inf": float("inf"), "zero": 0.0}[fill]
        buf = torch.full((ks.numel() + 16,), value, device="cuda")
        buf[: ks.numel()] = ks.flatten()
        o = attn_true(q8, k8, v, qs, buf[: ks.numel()].view_as(ks), tensor_layout="HND", output_dtype=torch.float16)
        nan = o.isnan()
        row[fill] = {"nan": bool(nan.any()), "nan_bh": nan.any(-1).any(-1).nonzero().tolist()[:4],
                     "nan_rows": nan.any(-1).any(0).any(0).nonzero().flatten().tolist()[:3]}
    res[f"S{s}"] = row
    print(s, row, flush=True)
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "sage_v1_kscale_probe.json"), "w"), indent=1)
