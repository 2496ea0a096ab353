"""SDPA's CUDA backends and cpattn's native providers on rows that see no key; sage at short causal lengths.

    python benchmarks/empty_rows_probe.py   (on a GPU; writes probe.json to $OUT; results/h100/empty_rows_probe.json)

Part 1 runs `sage` and `sage_varlen` causal at 4-24 heads and 24-64 tokens against float64 (NaN or not, max
error) and the raw `sageattn_varlen` at 12 and 24 heads. Part 2 runs a bool mask in which every third query row
sees no key through `native` and the three SDPA providers (output and gradient errors against float64), and
through SDPA itself with each backend forced (NaN in the output or dQ, largest output on the empty rows).
"""
import json, os, torch, cpattn
from cpattn.reference import reference_attention

torch.manual_seed(0)
res = {}
def err(a, b):
    return float((a.double() - b).abs().max())
for name in ("sage_varlen", "sage"):
    for h in (24, 12, 8, 6, 4):
        for s in (24, 48, 64):
            for causal in (True,):
                q, k, v = (torch.randn(2, h, s, 64, dtype=torch.float64) for _ in range(3))
                ref = reference_attention(q, k, v, None, causal)[0]
                qc, kc, vc = (t.to("cuda", torch.bfloat16) for t in (q, k, v))
                try:
                    with cpattn.attention_provider(name):
                        out = cpattn.attention_dispatch(qc, kc, vc, is_causal=causal)
                    r = {"nan": bool(out.isnan().any()), "err": err(out.cpu(), ref)}
                    if r["nan"]:
                        r["nan_heads"] = out.isnan().any(-1).any(-1).any(0).nonzero().flatten().tolist()
                        r["nan_rows"] = out.isnan().any(-1).any(1).any(0).nonzero().flatten().tolist()[:10]
                except Exception as e:
                    r = {"exc": str(e)[:200]}
                res[f"{name} H{h} S{s} causal={causal}"] = r
                print(name, h, s, causal, r, flush=True)
# the raw library call for the failing shape
import sageattention
try:
    from sageattention import sageattn_varlen
    for h in (24, 12):
        q, k, v = (torch.randn(48, h, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        cu = torch.tensor([0, 24, 48], dtype=torch.int32, device="cuda")
        out = sageattn_varlen(q, k, v, cu, cu, 24, 24, is_causal=True)
        print("raw sageattn_varlen H", h, "nan", bool(out.isnan().any()), flush=True)
        res[f"raw varlen H{h}"] = bool(out.isnan().any())
except Exception as e:
    print("raw failed", e)
# native with empty rows at W=1
b, s = 2, 64
mask = torch.rand(b, 1, s, s) < 0.7
mask[:, :, ::3] = False
q, k, v = (torch.randn(b, 8, s, 128, dtype=torch.float64, requires_grad=True) for _ in range(3))
dout = torch.randn(b, 8, s, 128, dtype=torch.float64)
ref = reference_attention(q, k, v, mask, False)[0]
ref.backward(dout)
for name in ("native", "_native_efficient", "_native_cudnn", "_native_math"):
    qc, kc, vc = (t.detach().to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v))
    with cpattn.attention_provider(name):
        out = cpattn.attention_dispatch(qc, kc, vc, attn_mask=mask.cuda())
    out.backward(dout.to("cuda", torch.bfloat16))
    r = {"out": err(out.cpu(), ref)} | {g: err(t.grad.cpu(), r_.grad) for g, t, r_ in zip(("dq", "dk", "dv"), (qc, kc, vc), (q, k, v))}
    print(name, r, flush=True)
    res[f"{name} empty rows"] = r
# SDPA itself (what native called before): which backend gives NaN
from torch.nn.attention import SDPBackend, sdpa_kernel
for be in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
    qc, kc, vc = (t.detach().to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v))
    try:
        with sdpa_kernel(be):
            out = torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask.cuda())
        out.backward(dout.to("cuda", torch.bfloat16))
        r = {"out_nan": bool(out.isnan().any()), "dq_nan": bool(qc.grad.isnan().any()), "out_empty_rows_max": float(out[:, :, ::3].abs().max())}
    except Exception as e:
        r = {"exc": str(e)[:200]}
    print("sdpa", be, r, flush=True)
    res[f"sdpa {be}"] = r
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "probe.json"), "w"), indent=1)
