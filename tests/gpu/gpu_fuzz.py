"""Random inputs through every provider on this GPU, each checked against float64 or refused by name.

    python tests/gpu/gpu_fuzz.py [--seconds-per-provider 40] [--seed 0] [--out benchmarks/results] [--device cpu]
    python tests/gpu/gpu_fuzz.py --replay benchmarks/results/h100/gpu_fuzz_h100.json --providers   # failures again

`tests/gpu/gpu_check.py` runs fixed cases; this draws them, as tests/distributed/test_fuzz.py does on the CPU, but with the
shapes models use on a GPU: head dims 32 to 256 (value head dim sometimes different), sequence lengths from 1 to
about 2k (odd, and queries != keys), GQA ratios 1 to 4, bf16 / fp16 / fp32, bool, additive and key-padding masks
(with fully masked rows), causal, a drawn scale, gradients or not, and (B, S, H, D) views as well as contiguous
(B, H, S, D) tensors. Seven draws in ten take dtype, mask and gradients from what the provider declares it takes. About a third of the draws repeat the previous draw's shapes with one option changed, so
dispatch's cached runner for that shape meets a call it must not serve.

Each draw ends one of three ways:
- ok: output (and gradients) within the dtype's tolerance of float64, finite, in the input's dtype and shape;
  a second identical call (the cached runner) gives the same output;
- refused: cpattn raised its own error (UnsupportedInputError, InvalidArgumentError, ProviderUnavailableError)
  before any result, and the message names the provider;
- failed: anything else (a wrong number, NaN, a library's own exception, a refusal that does not name the
  provider), with the draw's parameters, so it can be replayed.
Writes gpu_fuzz<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))

import cpattn  # noqa: E402
from cpattn.errors import CpattnError  # noqa: E402
from helpers import GRAD_ATOL, OUT_ATOL, reference_with_grads  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HEAD_DIMS = (32, 64, 80, 96, 128, 192, 256)
MASKS = (None, None, "bool", "bool_empty_rows", "additive", "key_padding")
DRAWN = ("provider", "batch", "q_heads", "kv_heads", "sq", "sk", "d", "dv", "seed", "dtype", "mask", "causal", "scale",
         "grad", "layout")  # a case, as drawn
RECORD = ("provider", "outcome", "batch", "q_heads", "kv_heads", "sq", "sk", "d", "dv", "dtype", "mask", "causal",
          "scale", "grad", "layout", "varied", "out_err", "dq_err")  # what each case's entry in "cases" keeps
OPTIONS = ("mask", "causal", "scale", "dtype", "grad", "layout")  # what a repeated shape changes


def draw_case(rng: random.Random, provider: str, caps=None, head_dims=HEAD_DIMS) -> dict:
    """A draw of everything; with `caps` (the provider's declared capabilities), dtype, mask and gradients come
    from what it declares it takes, so that fewer draws end in a refusal."""
    kv_heads, groups = rng.choice((1, 2, 4)), rng.choice((1, 1, 2, 3, 4))
    sq = rng.choice((rng.randint(1, 64), rng.randint(65, 2100)))
    d = rng.choice(head_dims)
    return dict(
        provider=provider, batch=rng.randint(1, 3), q_heads=kv_heads * groups, kv_heads=kv_heads, sq=sq,
        sk=sq if rng.random() < 0.7 else rng.randint(1, 2100), d=d, dv=d if rng.random() < 0.8 else rng.choice(head_dims),
        seed=rng.randint(0, 2**16), **draw_options(rng, caps))


def draw_options(rng: random.Random, caps=None) -> dict:
    dtypes, masks, grads = ("bfloat16", "bfloat16", "float16", "float32"), MASKS, (True, True, True, False, False)
    if caps is not None:
        dtypes = [n for n in dtypes if DTYPES[n] in caps.dtypes] or dtypes
        masks = [m for m in MASKS if m is None or (m == "key_padding" and caps.key_padding_mask)
                 or (m == "additive" and caps.additive_mask) or (m.startswith("bool") and caps.bool_mask)]
        grads = grads if caps.training else (False,)
    return dict(dtype=rng.choice(dtypes), mask=rng.choice(masks), causal=rng.random() < 0.5,
                scale=None if rng.random() < 0.7 else round(rng.uniform(0.03, 0.3), 4), grad=rng.choice(grads),
                layout=rng.choice(("bhsd", "bshd_view")))


def vary(rng: random.Random, case: dict) -> dict:
    """The same shapes with one option drawn again (until it differs)."""
    name = rng.choice(OPTIONS)
    while True:
        value = draw_options(rng)[name]
        if value != case[name]:
            return {**case, name: value, "seed": rng.randint(0, 2**16), "varied": name}


def make_inputs(case: dict, device):
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = DTYPES[case["dtype"]]
    b, hq, hkv, sq, sk, d, dv = (case[k] for k in ("batch", "q_heads", "kv_heads", "sq", "sk", "d", "dv"))

    def tensor(heads, length, dim):
        x = torch.randn(b, heads, length, dim, generator=gen, dtype=torch.float64)
        if case["layout"] == "bshd_view":  # stored as (B, S, H, D), handed over as its (B, H, S, D) view
            return x.transpose(1, 2).contiguous().to(device, dtype).transpose(1, 2)
        return x.to(device, dtype)
    q, k, v = tensor(hq, sq, d), tensor(hkv, sk, d), tensor(hkv, sk, dv)
    dout = torch.randn(b, hq, sq, dv, generator=gen, dtype=torch.float64).to(device)
    return q, k, v, dout, make_mask(case, gen, device)


def make_mask(case: dict, gen, device):
    kind, b, hq, sq, sk = (case[k] for k in ("mask", "batch", "q_heads", "sq", "sk"))
    if kind is None:
        return None
    if kind in ("bool", "bool_empty_rows"):
        m = torch.rand(b, 1, sq, sk, generator=gen) < 0.7
        if kind == "bool_empty_rows":
            m[:, :, ::3] = False
        return m.to(device)
    if kind == "additive":
        bias = torch.randn(b, hq, sq, sk, generator=gen, dtype=torch.float64)
        bias = bias.masked_fill(torch.rand(b, hq, sq, sk, generator=gen) < 0.2, float("-inf"))
        return bias.to(device, DTYPES[case["dtype"]])
    m = torch.ones(b, 1, 1, sk, dtype=torch.bool)  # key padding; batch row 0 keeps half its keys
    m[0, ..., sk // 2:] = False
    return m.to(device)


def _err(actual, expected) -> float:
    if not expected.numel():
        return 0.0
    return (actual.double() - expected).abs().max().item()


def run_case(case: dict, device) -> dict:
    """Run one draw; returns the case with `outcome` ("ok", "refused", "failed") and what was measured."""
    q, k, v, dout, mask = make_inputs(case, device)
    dtype = DTYPES[case["dtype"]]
    leaves = [t.detach().requires_grad_(case["grad"]) for t in (q, k, v)]
    kwargs = dict(attn_mask=mask, is_causal=case["causal"], scale=case["scale"],
                  enable_gqa=case["q_heads"] != case["kv_heads"])
    result = dict(case)
    try:
        with cpattn.attention_provider(case["provider"]):
            out = cpattn.attention_dispatch(*leaves, **kwargs)
    except CpattnError as exc:
        named = case["provider"] in str(exc) or case["provider"] == "auto"
        return result | {"outcome": "refused" if named else "failed", "error_type": type(exc).__name__,
                         "message": str(exc)[:1500], **({} if named else {"why": "refusal does not name provider"})}
    except Exception as exc:
        return result | {"outcome": "failed", "error_type": type(exc).__name__, "message": str(exc)[:1500],
                         "traceback": traceback.format_exc()[-2500:], "why": "not a cpattn error"}
    ref_out, _, ref_grads = reference_with_grads(q, k, v, dout, mask, case["causal"], case["scale"])
    # SageAttention quantizes Q and K to int8 whatever the input dtype: bf16's tolerance, as gpu_check gives it
    tol_dtype = torch.bfloat16 if "sage" in case["provider"] else dtype
    # the dtype tolerances hold for O(1) values at the default scale (see tests/distributed/test_fuzz.py assert_within)
    logits = max(1.0, (case["scale"] or case["d"] ** -0.5) * case["d"] ** 0.5)
    problems = []
    if out.dtype != dtype or tuple(out.shape) != tuple(ref_out.shape):
        problems.append(f"output {out.dtype} {tuple(out.shape)}, expected {dtype} {tuple(ref_out.shape)}")
    elif not torch.isfinite(out).all():
        problems.append("non-finite output")
    else:
        result["out_err"] = _err(out, ref_out)
        bound = 2 * OUT_ATOL[tol_dtype] * logits * max(1.0, ref_out.abs().max().item() if ref_out.numel() else 1.0)
        if result["out_err"] > bound:
            problems.append(f"out error {result['out_err']:.3g} > {bound:.3g}")
    if case["grad"] and not problems:
        try:
            out.backward(dout.to(dtype))
        except Exception as exc:
            return result | {"outcome": "failed", "error_type": type(exc).__name__, "message": str(exc)[:1500],
                             "traceback": traceback.format_exc()[-2500:], "why": "backward raised"}
        for name, leaf, ref in zip("qkv", leaves, ref_grads):
            if leaf.grad is None or not torch.isfinite(leaf.grad).all():
                problems.append(f"d{name} missing or non-finite")
                continue
            err = _err(leaf.grad, ref)
            result[f"d{name}_err"] = err
            bound = 2 * GRAD_ATOL[tol_dtype] * logits * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
            if err > bound:
                problems.append(f"d{name} error {err:.3g} > {bound:.3g}")
    if not problems:  # the same call again: dispatch serves it from the runner it cached for this signature
        with torch.no_grad(), cpattn.attention_provider(case["provider"]):
            again = cpattn.attention_dispatch(q, k, v, **kwargs)
        result["cached_err"] = _err(again, ref_out)
        if not torch.allclose(again.double(), out.detach().double(), atol=1e-2 * max(1.0, logits), rtol=0):
            problems.append(f"second call differs from the first (error {result['cached_err']:.3g})")
    return result | {"outcome": "failed" if problems else "ok", **({"why": "; ".join(problems)} if problems else {})}


def declared(provider: str, device: torch.device):
    """The capabilities `provider` declares on `device` (None for auto)."""
    return None if provider == "auto" else cpattn.PROVIDERS[provider].capabilities(device.type)


def device_providers(device: torch.device) -> list[str]:
    names = []
    for name, adapter in cpattn.PROVIDERS.items():
        caps = adapter.capabilities(device.type) if adapter.availability().ok else None
        if caps is None:
            continue
        if device.type == "cuda" and torch.cuda.get_device_capability() < (caps.min_compute_capability or (0, 0)):
            continue
        names.append(name)
    return names + ["auto"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", nargs="*")
    parser.add_argument("--seconds-per-provider", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--device", default="cuda", help="cpu: a quick run of the script itself")
    parser.add_argument("--replay", help="a gpu_fuzz JSON file: run its failures again first")
    parser.add_argument("--head-dims", type=int, nargs="*", default=list(HEAD_DIMS),
                        help="draw head dims from these (default: the common ones)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "seed": args.seed,
              "head_dims": args.head_dims,
              "date": time.strftime("%Y-%m-%d %H:%M"), "providers": {}, "failures": [], "refusals": {},
              "cases": []}
    path = os.path.join(args.out, f"gpu_fuzz{args.tag}.json")
    if args.replay:  # the failures of an earlier run, drawn again exactly: now ok, refused or still failing
        with open(args.replay) as f:
            earlier = json.load(f)["failures"]
        report["replayed"] = [run_case({k: c[k] for k in DRAWN}, device) for c in earlier]
        for result in report["replayed"]:
            print(f"replay {result['provider']}: {result['outcome']} {result.get('why', '')}", flush=True)
    for provider in args.providers if args.providers is not None else device_providers(device):
        rng = random.Random(f"{args.seed}/{provider}")
        counts, start, previous = {"ok": 0, "refused": 0, "failed": 0}, time.time(), None
        while time.time() - start < args.seconds_per_provider:
            caps = declared(provider, device) if rng.random() < 0.7 else None
            if previous and rng.random() < 0.35:
                case = vary(rng, previous)
            else:
                case = draw_case(rng, provider, caps, args.head_dims)
            try:
                result = run_case(case, device)
            except Exception as exc:  # the check itself failed (out of memory in the reference, say)
                result = case | {"outcome": "failed", "why": f"check raised {type(exc).__name__}: {exc}"[:800]}
            counts[result["outcome"]] += 1
            report["cases"].append({k: result.get(k) for k in RECORD})
            if result["outcome"] == "failed":
                report["failures"].append(result)
                print(f"FAIL {provider}: {result.get('why')} {result.get('message', '')[:300]}", flush=True)
            elif result["outcome"] == "refused":
                first_reason = result["message"].splitlines()[1 if "\n" in result["message"] else 0][:160]
                key = f"{provider}: {first_reason}"
                report["refusals"][key] = report["refusals"].get(key, 0) + 1
            previous = {k: v for k, v in case.items() if k != "varied"}
            torch.cuda.empty_cache()
        report["providers"][provider] = counts
        print(f"{provider}: {counts}", flush=True)
        write(report, path)  # after each provider: a run cut short by a time limit keeps what it did
    print(f"wrote {path}: {sum(c['failed'] for c in report['providers'].values())} failed")


def write(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
