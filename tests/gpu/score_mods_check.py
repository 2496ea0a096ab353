"""On one GPU: windows, softcaps and sinks through the real kernels, forward and backward, against float64.

    python tests/gpu/score_mods_check.py [--out benchmarks/results] [--tag TAG] [--budget 160] [--flex-budget 60]
                                         [--providers flash flex native _native_cudnn _native_efficient]
                                         [--seqs 128 1000 4096] [--device cuda]

For bf16 and fp16, S in {128, 1000, 4096} (B2 H16, B2 Hq8/Hkv2, B1 H4: GQA in the middle one) and D in {64, 128},
each provider runs `attention_dispatch` with a window (causal (S/4 - 1, 0), and a two-sided one), a softcap, sinks
and their combinations, with gradients of q, k, v and the sinks, against `cpattn.reference_attention` in float64
on the same inputs. `flash` also runs the contract's forward (out and the log-sum-exp with the sinks) and its
backward from the reference's (out, lse), what context-parallel schedules call, and a few extra calls: a window
(0, 0), a window wider than the sequence, a rectangular band (q_len != kv_len), and `flash_varlen` with a batch
row whose keys are all hidden, with sinks (forward only).

Each case is recorded with its max errors and its status: pass, fail (an error beyond the dtype's tolerance, or
an exception from a provider that took the call), refused (the provider declines the call, with its reasons:
SDPA has no softcap, for instance) or skipped (the provider is unavailable, with the reason, or the time budget
ran out). FA4 and flex compile a kernel per variant, so every modification runs at one representative shape first
(B2 S1000 D128, bf16 then fp16) and the other shapes after; flex's cases run last, on a share of the budget of
their own. Writes score_mods_check_<gpu><tag>.json and prints a one-line summary; exit 1 on any fail.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

import cpattn  # noqa: E402
from benchmarks.common import device_name, environment, results_path, write_results  # noqa: E402
from cpattn import attention_dispatch, attention_provider  # noqa: E402
from cpattn.call import make_call  # noqa: E402
from cpattn.contract import structure_reasons  # noqa: E402
from cpattn.reference import reference_attention  # noqa: E402

PROVIDERS = ("flash", "native", "_native_cudnn", "_native_efficient", "flex")
# Max abs error against float64, relative to max(1, the largest reference value): outputs are O(1); gradients
# (dK/dV sum over rows, dsinks over every row) grow with the sequence.
OUT_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
GRAD_TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
LSE_TOL = 2e-3  # the kernels' float32 log-sum-exp of the same bf16/fp16 inputs
SEQS = (128, 1000, 4096)
DEVICE = {"type": "cuda"}  # --device: "cpu" runs the script's own paths on the CPU providers (a dry run)
SOFTCAP = 2.0  # scores of these inputs reach 4 or so: the cap bends them
MODS = ("window", "window-two-sided", "softcap", "sinks", "window+softcap", "window+sinks", "softcap+sinks",
        "window+softcap+sinks")


@dataclass(frozen=True)
class Shape:
    batch: int
    q_heads: int
    kv_heads: int
    seq: int
    head_dim: int
    kv_seq: int | None = None  # q_len != kv_len where set

    @property
    def label(self) -> str:
        kv = f"/{self.kv_seq}" if self.kv_seq else ""
        return f"B{self.batch} Hq{self.q_heads} Hkv{self.kv_heads} S{self.seq}{kv} D{self.head_dim}"


@dataclass
class Case:
    provider: str
    dtype: torch.dtype
    shape: Shape
    mods: str
    causal: bool
    window: tuple | None
    softcap: float | None
    sinks: bool
    varlen_empty_row: bool = False  # flash_varlen: a key-padding mask hiding batch row 0, forward only
    contract: bool = False  # also the contract's forward/backward (flash)
    result: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"provider": self.provider, "dtype": str(self.dtype).replace("torch.", ""), "shape": self.shape.label,
                "mods": self.mods, "causal": self.causal, "window": self.window, "softcap": self.softcap,
                "sinks": self.sinks}


# -- cases ------------------------------------------------------------------------------------------------------


def shapes(seqs=SEQS) -> list[Shape]:
    heads = {128: (2, 16, 16), 1000: (2, 8, 2), 4096: (1, 4, 4)}  # a float64 reference of S 4096 stays small
    out = []
    for seq in seqs:
        batch, q_heads, kv_heads = heads.get(seq, (1, 4, 4))
        out += [Shape(batch, q_heads, kv_heads, seq, d) for d in (64, 128)]
    return out


def mods_case(provider: str, dtype, shape: Shape, mods: str) -> Case:
    parts = set(mods.split("+"))
    two_sided = "window-two-sided" in parts
    window = None
    if "window" in parts:
        window = (shape.seq // 4 - 1, 0)
    elif two_sided:
        window = (shape.seq // 8, shape.seq // 16)
    return Case(provider, dtype, shape, mods, causal=not two_sided, window=window,
                softcap=SOFTCAP if "softcap" in parts else None, sinks="sinks" in parts,
                contract=provider == "flash")


def extra_flash_cases() -> list[Case]:
    """Windows at the edges, a rectangular band, and rows without keys with sinks (flash_varlen, forward)."""
    dtype = torch.bfloat16
    square = Shape(2, 8, 2, 1000, 128)
    return [
        Case("flash", dtype, square, "window (0, 0)", False, (0, 0), None, True, contract=True),
        Case("flash", dtype, square, "window wider than S", True, (4000, 4000), SOFTCAP, False, contract=True),
        # top-left (100, 600) on 1000 queries x 1500 keys: window_size (600, 100) at the bottom-right corner
        Case("flash", dtype, Shape(1, 8, 8, 1000, 128, kv_seq=1500), "rectangular band", False, (100, 600),
             SOFTCAP, True, contract=True),
        Case("flash_varlen", dtype, Shape(3, 8, 8, 512, 128), "no keys in batch row 0 + sinks", False, None,
             SOFTCAP, True, varlen_empty_row=True),
    ]


def _representative_first(point) -> tuple:
    """Every modification at B2 S1000 D128 bf16 first, then fp16, then the other shapes: the kernels compile per
    variant (FA4's CuTe kernels, flex's Triton ones), and a budget that runs out must have seen each of them."""
    dtype, shape, _ = point
    return shape.seq != 1000, shape.head_dim != 128, dtype != torch.bfloat16


def all_cases(providers, seqs=SEQS) -> list[Case]:
    """Every provider on one input before the next input (its float64 reference is computed once); flex last."""
    grid = sorted(itertools.product((torch.bfloat16, torch.float16), shapes(seqs), MODS), key=_representative_first)
    cases = [mods_case(p, dtype, shape, mods) for dtype, shape, mods in grid for p in providers if p != "flex"]
    if "flash" in providers:
        first_pass = len(MODS) * len([p for p in providers if p != "flex"])  # every mod once at the first shape
        cases = cases[:first_pass] + extra_flash_cases() + cases[first_pass:]
    if "flex" in providers:
        cases += [mods_case("flex", dtype, shape, mods) for dtype, shape, mods in grid]
    return cases


# -- inputs and the reference -----------------------------------------------------------------------------------


def inputs(case: Case, seed: int = 0):
    device = DEVICE["type"]
    g = torch.Generator(device=device).manual_seed(seed)
    s = case.shape
    kv_seq = s.kv_seq or s.seq

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=g, dtype=torch.float32).to(case.dtype)

    q = randn(s.batch, s.q_heads, s.seq, s.head_dim)
    k, v = randn(s.batch, s.kv_heads, kv_seq, s.head_dim), randn(s.batch, s.kv_heads, kv_seq, s.head_dim)
    dout = randn(s.batch, s.q_heads, s.seq, s.head_dim)
    sinks = (torch.randn(s.q_heads, device=device, generator=g) + 1.0) if case.sinks else None
    mask = None
    if case.varlen_empty_row:
        mask = torch.rand(s.batch, 1, 1, kv_seq, device=device, generator=g) < 0.7
        mask[0] = False
    return q, k, v, dout, sinks, mask


def reference(case: Case, q, k, v, dout, sinks, mask):
    """float64 (out, lse, grads of q, k, v, sinks) on the same inputs."""
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    sinks64 = None if sinks is None else sinks.double().requires_grad_(True)
    out, lse = reference_attention(*leaves, mask, case.causal, window=case.window, softcap=case.softcap,
                                   sinks=sinks64)
    wrt = leaves + ([sinks64] if sinks64 is not None else [])
    grads = torch.autograd.grad(out, wrt, dout.double()) if not case.varlen_empty_row else ()
    return out.detach(), lse.detach(), grads


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs error over finite entries, relative to max(1, largest |want|); inf where NaN or -inf differ."""
    got, want = got.double(), want.double()
    if torch.isnan(got).any() or not torch.equal(torch.isneginf(got), torch.isneginf(want)):
        return math.inf
    finite = torch.isfinite(want)
    if not finite.any():
        return 0.0
    err = (got[finite] - want[finite]).abs().max().item()
    return err / max(1.0, want[finite].abs().max().item())


# -- running a case ---------------------------------------------------------------------------------------------


def provider_name(case: Case) -> str:
    return "flash_varlen" if case.varlen_empty_row else case.provider


def refusal(case: Case, call) -> dict | None:
    """The provider's reasons for declining `call` (with or without gradients), None where it takes it."""
    provider = cpattn.PROVIDERS[provider_name(case)]
    reasons = provider.reasons(call)
    if not reasons:
        return None
    caps = provider.capabilities(DEVICE["type"])
    expected = bool(caps is not None and structure_reasons(caps, call)) or case.provider != "flash"
    return {"status": "refused" if expected else "fail", "reasons": reasons}


def run_dispatch(case: Case, q, k, v, dout, sinks, mask, ref) -> dict:
    ref_out, _, ref_grads = ref
    leaves = [t.clone().requires_grad_(not case.varlen_empty_row) for t in (q, k, v)]
    sink_leaf = None if sinks is None else sinks.clone().requires_grad_(not case.varlen_empty_row)
    with attention_provider(provider_name(case)):
        out = attention_dispatch(*leaves, attn_mask=mask, is_causal=case.causal, enable_gqa=q.shape[1] != k.shape[1],
                                 window=case.window, softcap=case.softcap, sinks=sink_leaf)
    errors = {"out": _rel_err(out, ref_out)}
    if not case.varlen_empty_row:
        wrt = leaves + ([sink_leaf] if sink_leaf is not None else [])
        grads = torch.autograd.grad(out, wrt, dout)
        for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
            errors[name] = _rel_err(got, want)
    return errors


def run_contract(case: Case, q, k, v, dout, sinks, ref) -> dict:
    """The contract's forward (out, lse with the sinks) and its backward from the reference's (out, lse)."""
    ref_out, ref_lse, ref_grads = ref
    provider = cpattn.PROVIDERS[case.provider]
    call = make_call(q, k, v, None, 0.0, case.causal, None, q.shape[1] != k.shape[1], window=case.window,
                     softcap=case.softcap, sinks=sinks)
    out, lse = provider.forward(call)
    errors = {"contract_out": _rel_err(out, ref_out), "contract_lse": _rel_err(lse, ref_lse)}
    grads = provider.backward(call, dout, ref_out.float(), ref_lse.float())
    for name, got, want in zip(("contract_dq", "contract_dk", "contract_dv"), grads, ref_grads):
        errors[name] = _rel_err(got, want)
    return errors


def verdict(case: Case, errors: dict) -> bool:
    out_tol, grad_tol = OUT_TOL[case.dtype], GRAD_TOL[case.dtype]
    for name, err in errors.items():
        tol = LSE_TOL if name.endswith("lse") else (out_tol if name.endswith("out") else grad_tol)
        if not err <= tol:  # NaN and inf fail too
            return False
    return True


def run_case(case: Case, cache: dict) -> None:
    started = time.perf_counter()
    key = (case.dtype, case.shape, case.causal, case.window, case.softcap, case.sinks, case.varlen_empty_row)
    if key not in cache:  # the inputs and float64 reference serve every provider
        cache.clear()
        tensors = inputs(case)
        cache[key] = (tensors, reference(case, *tensors))
    (q, k, v, dout, sinks, mask), ref = cache[key]
    grads = not case.varlen_empty_row
    leaves = [t.requires_grad_(grads) for t in (q.clone(), k.clone(), v.clone())]
    call = make_call(*leaves, mask, 0.0, case.causal, None, q.shape[1] != k.shape[1], window=case.window,
                     softcap=case.softcap, sinks=sinks)
    refused = refusal(case, call)
    if refused is not None:
        case.result.update(refused)
        return
    try:
        errors = run_dispatch(case, q, k, v, dout, sinks, mask, ref)
        if case.contract:
            errors.update(run_contract(case, q, k, v, dout, sinks, ref))
        case.result.update(status="pass" if verdict(case, errors) else "fail", errors=errors)
    except Exception as exc:  # noqa: BLE001 - a failure to record, not to stop on
        case.result.update(status="fail", error=f"{type(exc).__name__}: {str(exc)[:400]}")
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
    finally:
        case.result.setdefault("seconds", round(time.perf_counter() - started, 3))


# -- the run ----------------------------------------------------------------------------------------------------


def availability_reasons(names) -> dict[str, str]:
    """Providers that cannot run here, with the reason."""
    out = {}
    for name in names:
        provider = cpattn.PROVIDERS.get(name)
        if provider is None:
            out[name] = "no such provider in this cpattn"
            continue
        avail = provider.availability()
        if not avail.ok:
            out[name] = avail.reason
    return out


def run(cases: list[Case], budget: float, flex_budget: float) -> None:
    """Each case in turn; flex's cases (last) keep `flex_budget` of the `budget` seconds for themselves."""
    unavailable = availability_reasons({provider_name(c) for c in cases})
    started = time.perf_counter()
    reserved = flex_budget if any(c.provider == "flex" and "flex" not in unavailable for c in cases) else 0.0
    cache: dict = {}
    for case in cases:
        name = provider_name(case)
        deadline = started + (budget if name == "flex" else budget - reserved)
        if name in unavailable:
            case.result.update(status="skipped", reason=f"provider '{name}' unavailable: {unavailable[name]}")
        elif time.perf_counter() > deadline:
            case.result.update(status="skipped", reason="time budget spent (see --budget, --flex-budget)")
        else:
            run_case(case, cache)


def summary(cases: list[Case]) -> dict:
    counts = {"pass": 0, "fail": 0, "refused": 0, "skipped": 0}
    for case in cases:
        counts[case.result["status"]] += 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--budget", type=float, default=160.0, help="seconds for all cases (default %(default)s)")
    parser.add_argument("--flex-budget", type=float, default=60.0, help="seconds of them for flex's compiles")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    parser.add_argument("--seqs", nargs="+", type=int, default=list(SEQS))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    DEVICE["type"] = args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        print("score_mods_check: no CUDA device")
        return 1
    started = time.perf_counter()
    cases = all_cases(args.providers, args.seqs)
    run(cases, args.budget, args.flex_budget)
    counts = summary(cases)
    flash = cpattn.PROVIDERS["flash"]
    result = {
        "environment": environment(), "device": device_name(args.device),
        "flash": flash.availability().version if flash.availability().ok else flash.availability().reason,
        "fast_paths": str(cpattn.providers.flash.fast_path_status(flash)),
        "tolerances": {"out": {str(k): v for k, v in OUT_TOL.items()}, "grad": {str(k): v for k, v in GRAD_TOL.items()},
                       "lse": LSE_TOL, "relative to": "max(1, largest |reference|)"},
        "counts": counts, "seconds": round(time.perf_counter() - started, 1),
        "cases": [dict(c.describe(), **c.result) for c in cases],
    }
    path = write_results(results_path("score_mods_check", device_name(args.device), args.out, args.tag), result)
    for case in cases:
        if case.result["status"] == "fail":
            print("FAILED", dict(case.describe(), **case.result))
    print(f"score_mods_check: {len(cases)} cases, {counts['pass']} pass, {counts['fail']} fail, {counts['refused']} "
          f"refused, {counts['skipped']} skipped in {result['seconds']} s; flash: {result['flash']}; wrote {path}")
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
