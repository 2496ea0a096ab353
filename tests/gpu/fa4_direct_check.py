"""On an sm90 GPU with flash-attn-4: cpattn's direct launches of FA4's kernels against the library's functions.

    python tests/gpu/fa4_direct_check.py [--out DIR] [--tag TAG]

Forward (cpattn/providers/flash/fa4_sm90_forward.py):
For each case (head dims 64 to 256, causal or not, equal and unequal lengths, lengths off the tile, grouped and
multi-query heads, batch 2, bf16 and fp16, contiguous (B, S, H, D) tensors and transpose views of (B, H, S, D)
storage, with and without the log-sum-exp), the direct launch must give the bits `_flash_attn_fwd` gives. Then:
`can_launch` must refuse what the kernel does not assume (an unaligned address, float32, CPU tensors, a sliced head
dim), the `flash` provider's forward must match float64 and run the direct launch, one kernel must be compiled per
shape class, and the host time per call of both ways at a small shape is recorded.

Backward (`Sm90BackwardKernels.launch_backward` in cpattn/providers/flash/fa4_sm90_backward.py) against
`_flash_attn_bwd` on the same inputs: dK and dV bit for bit, dQ (summed by float32 atomic adds in either) within
one rounding step of its dtype at its largest value; the library's own two runs' dQ difference is recorded beside
it. Cases: head dims 64 to 256, causal or not, lengths off the tile and unequal, bf16 views and fp16, and a dO of
stride 0 (what `.sum()` hands back), which both make contiguous. Then the `flash` provider's training path through `attention_dispatch`
against float64, counting the direct launches, and the host time per backward of both ways.
Varlen (`--only varlen`, the `flash_varlen` generation's launches with cu_seqlens): forward out and lse, and backward
dK and dV, bit for bit against `_flash_attn_fwd` / `_flash_attn_bwd` given the same cu_seqlens, dQ within one
rounding step; packings with rows that see no key (key length 0), one-row documents and lengths off the tile; and
the host time per call both ways.
Exit 1 on any failure; writes fa4_direct_check<TAG>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests", "support"))

import cpattn  # noqa: E402
from benchmarks.common import per_call_us  # noqa: E402
from cpattn.call import make_call  # noqa: E402
from cpattn.providers.flash.fa4_sm90_forward import Sm90Forward  # noqa: E402


def _inputs(b, sq, sk, hq, hk, d, dv, dtype, views, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def one(s, h, dim):
        if views:  # (B, S, H, D) view of (B, H, S, D) storage: what dispatch hands the kernels
            return torch.randn(b, h, s, dim, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
        return torch.randn(b, s, h, dim, device="cuda", dtype=dtype, generator=g)
    return one(sq, hq, d), one(sk, hk, d), one(sk, hk, dv)


def bitwise_cases(api, direct: Sm90Forward) -> list[dict]:
    shapes = [  # b, sq, sk, hq, hk, d, dv
        (1, 2048, 2048, 16, 16, 128, 128), (2, 777, 777, 8, 8, 64, 64), (1, 300, 900, 8, 8, 128, 128),
        (1, 900, 300, 4, 4, 96, 96), (2, 513, 513, 8, 2, 128, 128), (1, 1000, 1000, 6, 1, 64, 64),
        (1, 1, 64, 4, 4, 128, 128), (1, 256, 256, 24, 24, 256, 256), (1, 384, 384, 4, 4, 192, 128),
        (1, 4096, 4096, 16, 16, 64, 64),
    ]
    rows = []
    for i, (b, sq, sk, hq, hk, d, dv) in enumerate(shapes):
        for causal in (False, True):
            variants = [(torch.bfloat16, True, True, None)]  # fp16 and no-LSE kernels on a few shapes (compiles)
            variants += [(torch.float16, False, True, 0.3)] if i in (0, 1) else []
            variants += [(torch.bfloat16, False, False, None)] if i in (0, 4) else []
            for dtype, views, lse, scale in variants:
                q, k, v = _inputs(b, sq, sk, hq, hk, d, dv, dtype, views, seed=i)
                row = {"shape": [b, sq, sk, hq, hk, d, dv], "causal": causal, "dtype": str(dtype), "views": views,
                       "return_lse": lse, "scale": scale}
                try:
                    assert direct.can_launch(q, k, v), "can_launch refused an aligned case"
                    want = api._flash_attn_fwd(q=q, k=k, v=v, softmax_scale=scale, causal=causal, return_lse=lse)
                    got = direct(q, k, v, scale, causal, return_lse=lse)
                    row["out_equal"] = torch.equal(got[0], want[0])
                    row["lse_equal"] = torch.equal(got[1], want[1]) if lse else got[1] is None
                    row["ok"] = row["out_equal"] and row["lse_equal"] and torch.isfinite(got[0]).all().item()
                except Exception as exc:  # noqa: BLE001 - a failure to record, not to stop on
                    row["ok"], row["error"] = False, f"{type(exc).__name__}: {str(exc)[:300]}"
                rows.append(row)
    return rows


def refusal_cases(direct: Sm90Forward) -> list[dict]:
    q, k, v = _inputs(1, 256, 256, 4, 4, 64, 64, torch.bfloat16, False, seed=0)
    wide = torch.randn(1, 256, 4, 68, device="cuda", dtype=torch.bfloat16)
    odd = torch.randn(256 * 4 * 64 + 1, device="cuda", dtype=torch.bfloat16)[1:].view(1, 256, 4, 64)
    six_heads = torch.randn(1, 256, 6, 64, device="cuda", dtype=torch.bfloat16)
    cases = {
        "address off 16 bytes": (odd, k, v),
        "float32": (q.float(), k.float(), v.float()),
        "cpu tensors": (q.cpu(), k.cpu(), v.cpu()),
        "head dim sliced from 68 (strides off 16 bytes)": (wide[..., :64], k, v),
        "query heads not a multiple of key heads": (six_heads, k, v),
    }
    rows = [{"case": "aligned control", "refused": not direct.can_launch(q, k, v), "ok": direct.can_launch(q, k, v)}]
    for name, (a, b_, c) in cases.items():
        refused = not direct.can_launch(a, b_, c)
        rows.append({"case": name, "refused": refused, "ok": refused})
    return rows


class _Counting:
    """Sm90Forward with a count of its launches: shows the provider went the direct way."""

    def __init__(self, inner: Sm90Forward):
        self.inner, self.calls = inner, 0

    def can_launch(self, q, k, v):
        return self.inner.can_launch(q, k, v)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def provider_cases() -> list[dict]:
    """The `flash` provider's forward (the ring's block call) on the direct launch, against float64."""
    provider = cpattn.PROVIDERS["flash"]
    gen = provider.generation()
    real, counting = gen._direct_forward, _Counting(gen._direct_forward)
    gen._direct_forward = counting
    rows = []
    try:
        for hq, hk, s, causal in ((16, 16, 1024, True), (8, 2, 777, False), (24, 24, 24, True)):
            g = torch.Generator(device="cuda").manual_seed(hq + s)
            q = torch.randn(2, hq, s, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            k, v = (torch.randn(2, hk, s, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
            before = counting.calls
            out, lse = provider.forward(make_call(q, k, v, None, 0.0, causal, None, hq != hk))
            kd, vd = (t.double().repeat_interleave(hq // hk, dim=1) for t in (k, v))
            scores = q.double() @ kd.transpose(-1, -2) / 128 ** 0.5
            if causal:
                scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
            want_lse, want = scores.logsumexp(-1), scores.softmax(-1) @ vd
            err, lse_err = (out.double() - want).abs().max().item(), (lse.double() - want_lse).abs().max().item()
            launched = counting.calls - before
            rows.append({"heads": [hq, hk], "S": s, "causal": causal, "out_max_error": err,
                         "lse_max_error": lse_err, "direct_launches": launched,
                         "ok": err < 0.02 and lse_err < 1e-3 and launched == 1})
    finally:
        gen._direct_forward = real
    return rows


def host_time(api, direct: Sm90Forward, n: int = 400) -> dict:
    """Median host time per call, alternating, the GPU drained every 32 calls (B=1, H=16, S=128, D=64)."""
    q, k, v = _inputs(1, 128, 128, 16, 16, 64, 64, torch.bfloat16, True, seed=1)
    fns = {"library _flash_attn_fwd": lambda: api._flash_attn_fwd(q=q, k=k, v=v, causal=True, return_lse=True),
           "direct": lambda: direct(q, k, v, None, True, return_lse=True),
           "direct with can_launch": lambda: direct.can_launch(q, k, v) and direct(q, k, v, None, True,
                                                                                   return_lse=True)}
    for fn in fns.values():  # compiles, first allocations
        fn()
    return per_call_us(fns, n)


def backward_cases(api, rows) -> list[dict]:
    shapes = [(1, 2048, 2048, 16, 128), (2, 777, 777, 8, 64), (1, 300, 900, 8, 128), (1, 900, 300, 4, 96),
              (1, 256, 256, 24, 256), (1, 384, 384, 4, 192), (1, 4096, 4096, 16, 64)]
    out_rows = []
    for i, (b, sq, sk, h, d) in enumerate(shapes):
        for causal in (False, True):
            if causal and sq != sk:
                continue
            variants = [(torch.bfloat16, True, "random")]
            variants += [(torch.float16, False, "random")] if i in (0, 1) else []
            variants += [(torch.bfloat16, True, "stride 0")] if i in (1, 2) else []
            for dtype, views, grad in variants:
                q, k, v = _inputs(b, sq, sk, h, h, d, d, dtype, views, seed=10 + i)
                row = {"shape": [b, sq, sk, h, d], "causal": causal, "dtype": str(dtype), "views": views,
                       "dout": grad}
                try:
                    out, lse = api._flash_attn_fwd(q=q, k=k, v=v, causal=causal, return_lse=True)[:2]
                    dout = (torch.randn_like(out) if grad == "random"
                            else torch.ones((), device="cuda", dtype=dtype).expand(out.shape))
                    assert rows.can_launch_backward(q, k, v), "can_launch_backward refused"
                    want = api._flash_attn_bwd(q=q, k=k, v=v, out=out, dout=dout, lse=lse, causal=causal)[:3]
                    again = api._flash_attn_bwd(q=q, k=k, v=v, out=out, dout=dout, lse=lse, causal=causal)[:3]
                    got = rows.launch_backward(q, k, v, out, dout, lse, None, causal)
                    row["dk_equal"], row["dv_equal"] = torch.equal(got[1], want[1]), torch.equal(got[2], want[2])
                    top = want[0].abs().max().item()
                    step = top * 2.0 ** -(7 if dtype == torch.bfloat16 else 10)  # one rounding step at the top
                    row["dq_max_diff"] = (got[0].float() - want[0].float()).abs().max().item()
                    row["dq_library_run_to_run"] = (again[0].float() - want[0].float()).abs().max().item()
                    row["dq_step"] = step
                    row["ok"] = (row["dk_equal"] and row["dv_equal"] and row["dq_max_diff"] <= step
                                 and all(torch.isfinite(t).all().item() for t in got))
                except Exception as exc:  # noqa: BLE001
                    row["ok"], row["error"] = False, f"{type(exc).__name__}: {str(exc)[:300]}"
                out_rows.append(row)
    return out_rows


class _CountingRows:
    """Sm90BackwardKernels with a count of its one-call backwards."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def launch_backward(self, *args, **kwargs):
        self.calls += 1
        return self.inner.launch_backward(*args, **kwargs)


def training_cases() -> list[dict]:
    """attention_dispatch on `flash` with gradients (FA4's training path: a shape's second call, on the cached
    runner) against float64."""
    gen = cpattn.PROVIDERS["flash"].generation()
    real, counting = gen._backward_kernels, _CountingRows(gen._backward_kernels)
    gen._backward_kernels = counting
    out_rows = []
    try:
        for b, h, s, d, causal in ((2, 16, 1024, 128, True), (1, 8, 777, 64, False), (2, 24, 24, 64, True)):
            g = torch.Generator(device="cuda").manual_seed(b * s + d)
            q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                       for _ in range(3))
            dout = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2):  # a shape's first call runs the public function; later ones the cached runner
                q.grad = k.grad = v.grad = None
                before = counting.calls
                with cpattn.attention_provider("flash"):
                    out = cpattn.attention_dispatch(q, k, v, is_causal=causal)
                out.backward(dout)
            q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
            ref = torch.nn.functional.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
            ref.backward(dout.double())
            errors = {"out": (out.double() - ref).abs().max().item()}
            for name, t, r in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
                errors[name] = (t.grad.double() - r.grad).abs().max().item()
            launched = counting.calls - before
            out_rows.append({"shape": [b, h, s, d], "causal": causal, "max_errors": errors,
                             "direct_backwards": launched,
                             "ok": errors["out"] < 0.02 and max(errors.values()) < 0.05 and launched == 1})
    finally:
        gen._backward_kernels = real
    return out_rows


def backward_host_time(api, rows, n: int = 300) -> dict:
    """Median host time per backward, alternating, the GPU drained every 32 calls (B=1, H=16, S=128, D=64)."""
    q, k, v = _inputs(1, 128, 128, 16, 16, 64, 64, torch.bfloat16, True, seed=2)
    out, lse = api._flash_attn_fwd(q=q, k=k, v=v, causal=True, return_lse=True)[:2]
    dout = torch.randn_like(out)
    fns = {"library _flash_attn_bwd": lambda: api._flash_attn_bwd(q=q, k=k, v=v, out=out, dout=dout, lse=lse,
                                                                  causal=True),
           "direct with can_launch_backward": lambda: rows.can_launch_backward(q, k, v) and rows.launch_backward(
                q, k, v, out, dout, lse, None, True)}
    for fn in fns.values():  # compiles, first allocations
        fn()
    return per_call_us(fns, n)


def _packed_inputs(lengths_q, lengths_k, hq, hk, d, dtype, seed):
    from cpattn.providers.flash.layout import Packing

    g = torch.Generator(device="cuda").manual_seed(seed)
    cu = lambda n: torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device="cuda")  # noqa: E731
    q = torch.randn(sum(lengths_q), hq, d, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(sum(lengths_k), hk, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    return q, k, v, Packing(cu(lengths_q), cu(lengths_k), max(lengths_q), max(lengths_k))


# (lengths_q, lengths_k, hq, hk, d): documents as the packed ring's chains hold them, rows without keys between
# pieces (key length 0), one-row documents, lengths off the tile, a single long one
VARLEN_SHAPES = [
    ([2067, 2566, 4997, 300, 1], None, 16, 16, 128),
    ([700, 37, 0, 1024, 5], [700, 37, 0, 1024, 5], 16, 16, 128),
    ([640, 300, 333], [0, 300, 333], 16, 16, 128),
    ([513, 129, 1, 900], [1000, 129, 64, 3], 16, 16, 128),
    ([777, 31], None, 8, 2, 64),
    ([300, 1, 513], [0, 1, 513], 8, 8, 64),
    ([257, 600], None, 4, 4, 256),
    ([129, 384], None, 4, 4, 96),
]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where the other is NaN (rows without keys must come out alike either way)."""
    nan = torch.isnan(a)
    return bool(torch.equal(nan, torch.isnan(b)) and torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0)))


def varlen_cases(api, direct: Sm90Forward, kernels) -> list[dict]:
    """The varlen launches (flash_varlen, a packed ring's chains) against the library's functions with the same
    cu_seqlens: forward out and lse bit for bit, backward dK and dV bit for bit and dQ within one rounding step."""
    rows = []
    for i, (lengths_q, lengths_k, hq, hk, d) in enumerate(VARLEN_SHAPES):
        for causal in (False, True):  # causal with unequal lengths: bottom-right in both
            for dtype in (torch.bfloat16,) + ((torch.float16,) if i == 0 else ()):
                q, k, v, packing = _packed_inputs(lengths_q, lengths_k or lengths_q, hq, hk, d, dtype, seed=40 + i)
                row = {"lengths_q": lengths_q, "lengths_k": lengths_k or lengths_q, "heads": [hq, hk], "d": d,
                       "causal": causal, "dtype": str(dtype)}
                try:
                    assert direct.can_launch_varlen(q, k, v, packing), "can_launch_varlen refused"
                    want = api._flash_attn_fwd(q=q, k=k, v=v, **packing.kwargs(), causal=causal, return_lse=True)
                    got = direct.launch_varlen(q, k, v, packing, None, causal)
                    row["out_equal"], row["lse_equal"] = _same_bits(got[0], want[0]), _same_bits(got[1], want[1])
                    row["ok"] = row["out_equal"] and row["lse_equal"]
                    if hq == hk:
                        dout = torch.randn_like(want[0])
                        out, lse = want[0], want[1]
                        assert kernels.can_launch_varlen_backward(q, k, v, packing), "refused the backward"
                        lib = api._flash_attn_bwd(q=q, k=k, v=v, out=out, dout=dout, lse=lse, **packing.kwargs(),
                                                  causal=causal)[:3]
                        mine = kernels.launch_varlen_backward(q, k, v, out, dout, lse, packing, None, causal)
                        step = lib[0].abs().max().item() * 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
                        row["dk_equal"], row["dv_equal"] = _same_bits(mine[1], lib[1]), _same_bits(mine[2], lib[2])
                        row["dq_max_diff"], row["dq_step"] = (mine[0].float() - lib[0].float()).abs().max().item(), step
                        row["ok"] = (row["ok"] and row["dk_equal"] and row["dv_equal"] and row["dq_max_diff"] <= step
                                     and all(torch.isfinite(t).all().item() for t in mine))
                except Exception as exc:  # noqa: BLE001
                    row["ok"], row["error"] = False, f"{type(exc).__name__}: {str(exc)[:300]}"
                rows.append(row)
    return rows


def varlen_host_time(api, direct: Sm90Forward, kernels, n: int = 300) -> dict:
    """Median host time per varlen forward and backward, both ways (4 documents of 32 rows, H=16, D=64)."""
    q, k, v, packing = _packed_inputs([32] * 4, [32] * 4, 16, 16, 64, torch.bfloat16, seed=3)
    out, lse = api._flash_attn_fwd(q=q, k=k, v=v, **packing.kwargs(), causal=True, return_lse=True)[:2]
    dout = torch.randn_like(out)
    fns = {"library _flash_attn_fwd": lambda: api._flash_attn_fwd(q=q, k=k, v=v, **packing.kwargs(), causal=True,
                                                                  return_lse=True),
           "direct forward with can_launch_varlen": lambda: direct.can_launch_varlen(q, k, v, packing) and (
                direct.launch_varlen(q, k, v, packing, None, True)),
           "library _flash_attn_bwd": lambda: api._flash_attn_bwd(q=q, k=k, v=v, out=out, dout=dout, lse=lse,
                                                                  **packing.kwargs(), causal=True),
           "direct backward with can_launch_varlen_backward": lambda: kernels.can_launch_varlen_backward(
                q, k, v, packing) and kernels.launch_varlen_backward(q, k, v, out, dout, lse, packing, None, True)}
    for fn in fns.values():  # compiles, first allocations
        fn()
    return per_call_us(fns, n)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--only", choices=("varlen",), default=None,
                        help="varlen: only the varlen launches (flash_varlen's generation)")
    args = parser.parse_args()
    import flash_attn.cute.interface as api

    if args.only == "varlen":
        return varlen_main(api, args)

    direct = Sm90Forward.load(api, cpattn.PROVIDERS["flash"].generation().version)
    status = cpattn.providers.flash.fast_path_status(cpattn.PROVIDERS["flash"])
    assert direct is not None, f"fa4_sm90_forward is off: {status}"
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "flash": cpattn.PROVIDERS["flash"].availability().version}
    result["bitwise"] = bitwise_cases(api, direct)
    # one compile per shape class: dtype, head dims, heads per KV head, causal, lse, broadcast dims
    classes = {(r["dtype"], *r["shape"][5:], r["shape"][3] // r["shape"][4], r["causal"], r["return_lse"])
               for r in result["bitwise"] if "error" not in r}
    result["compiled"], result["shape_classes"] = len(direct._compiled), len(classes)
    result["refusals"] = refusal_cases(direct)
    result["provider"] = provider_cases()
    result["host_us"] = host_time(api, direct)
    rows = cpattn.PROVIDERS["flash"].generation()._backward_kernels
    assert rows is not None, "fa4_sm90_backward is off for this flash-attn-4 version"
    result["backward"] = backward_cases(api, rows)
    result["training"] = training_cases()
    result["backward_host_us"] = backward_host_time(api, rows)
    checks = result["bitwise"] + result["refusals"] + result["provider"] + result["backward"] + result["training"]
    failed = [c for c in checks if not c["ok"]]
    if result["compiled"] != result["shape_classes"]:
        failed.append({"compiled": result["compiled"], "shape_classes": result["shape_classes"]})
    result["checks"], result["failed"] = len(checks) + 1, len(failed)
    return _report(result, failed, args, f"{len(checks) + 1 - len(failed)} of {len(checks) + 1} passed; host us "
                                         f"per forward {result['host_us']}, per backward {result['backward_host_us']}")


def _report(result: dict, failed: list, args, summary: str) -> int:
    """Writes fa4_direct_check<TAG>.json, prints the failures and `summary`; the exit status."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"fa4_direct_check{args.tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    for c in failed:
        print("FAILED", c)
    print(f"{summary}; wrote {path}")
    return 1 if failed else 0


def varlen_main(api, args) -> int:
    gen = cpattn.PROVIDERS["flash_varlen"].generation()
    direct, kernels = gen._varlen_forward, gen._varlen_kernels
    assert direct is not None and kernels is not None, (f"varlen launches are off: {gen.fast_path_status()} "
                                                        "(CPATTN_FA4_FAST_PATHS=force runs them before they pass)")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "flash_varlen": gen.version,
              "varlen": varlen_cases(api, direct, kernels)}
    result["varlen_host_us"] = varlen_host_time(api, direct, kernels)
    failed = [c for c in result["varlen"] if not c["ok"]]
    result["checks"], result["failed"] = len(result["varlen"]), len(failed)
    return _report(result, failed, args, f"{len(result['varlen']) - len(failed)} of {len(result['varlen'])} varlen "
                                         f"cases passed; host us {result['varlen_host_us']}")


if __name__ == "__main__":
    sys.exit(main())
