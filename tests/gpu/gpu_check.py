"""GPU correctness check: every provider whose library runs on this GPU, against the float64 reference.

    python tests/gpu/gpu_check.py [--out benchmarks/results] [--cp-worlds 2 3 4]

Single device: forward through `attention_dispatch` and backward where the provider trains, the contract's
(out, lse) and its backward with an external (out, lse). Context parallel: several ranks on this one GPU
over gloo (point-to-point staged through CPU), ring / Ulysses / all-gather, forward and backward.
Writes gpu_check_<gpu>.json with every number and every failure message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "support"))

import cpattn  # noqa: E402
from cpattn.call import make_call  # noqa: E402
from helpers import GRAD_ATOL, OUT_ATOL, make_qkv, reference_with_grads  # noqa: E402

LSE_ATOL = 2e-2
# The providers whose libraries run on the lent GPU and that differ in their CP path (native = its cuDNN block).
CP_PROVIDERS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "flex", "sage")


def _err(a, b) -> float:
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    if not finite.any():
        return 0.0
    if not torch.equal(torch.isfinite(a), finite):
        return float("inf")
    return (a[finite] - b[finite]).abs().max().item()


def single_cases(provider, caps):
    dtype = torch.bfloat16 if torch.bfloat16 in caps.dtypes else sorted(caps.dtypes, key=str)[0]
    head_dim = 128 if (caps.max_head_dim or 512) >= 128 else 64
    cases = []
    for causal in (False, True):
        cases.append(dict(name=f"B2 Hq8 Hkv8 S1000 D{head_dim} causal={causal}", shape=(2, 8, 8, 1000, 1000, head_dim),
                          dtype=dtype, causal=causal, mask=None))
    if caps.gqa:
        cases.append(dict(name=f"GQA Hq8 Hkv2 S777 D{head_dim} causal", shape=(1, 8, 2, 777, 777, head_dim),
                          dtype=dtype, causal=True, mask=None))
    cases.append(dict(name="heads==seq H64 S64 D64", shape=(1, 64, 64, 64, 64, 64), dtype=dtype, causal=False,
                      mask=None))
    if caps.bool_mask or caps.key_padding_mask:
        cases.append(dict(name=f"key padding (one batch row fully padded) S512 D{head_dim}",
                          shape=(2, 4, 4, 512, 512, head_dim), dtype=dtype, causal=False, mask="key_padding"))
    if caps.bool_mask:
        cases.append(dict(name=f"bool mask with empty rows S300 D{head_dim}", shape=(2, 4, 4, 300, 300, head_dim),
                          dtype=dtype, causal=False, mask="bool"))
    return cases


def build_mask(kind, b, sq, sk, device):
    if kind is None:
        return None
    if kind == "key_padding":
        m = torch.ones(b, 1, 1, sk, dtype=torch.bool, device=device)
        m[0, ..., sk // 3:] = False
        m[1, ..., :] = True
        return m
    g = torch.Generator().manual_seed(3)
    m = torch.rand(b, 1, sq, sk, generator=g) < 0.6
    m[:, :, 5] = False
    return m.to(device)


AUTOCAST_PROVIDERS = ("flash", "_native_cudnn", "native", "auto")


def check_autocast(name, device) -> dict:
    """float32 leaves under torch.autocast(bf16), GQA and causal, dispatched twice (the second call runs the cached
    runner): the output is bf16 and matches float64 on the bf16-cast inputs; gradients reach the leaves as
    float32 and match too."""
    entry = {"provider": name, "case": "autocast bf16, float32 inputs, GQA Hq8 Hkv2 S777 D128 causal"}
    b, hq, hkv, s, d = 1, 8, 2, 777, 128
    dout = torch.randn(b, hq, s, d, device=device).to(torch.bfloat16)
    ok = True
    for attempt in ("first", "cached"):
        q, k, v = make_qkv(b, hq, hkv, s, s, d, device=device, seed=11, requires_grad=True)
        rounded = [t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
        ref_out, _, ref_grads = reference_with_grads(*rounded, dout, None, True)
        with torch.autocast("cuda", dtype=torch.bfloat16), cpattn.attention_provider(name):
            out = cpattn.attention_dispatch(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(dout)
        entry[f"{attempt}_out_dtype"] = str(out.dtype)
        entry[f"{attempt}_grad_dtypes"] = sorted({str(t.grad.dtype) for t in (q, k, v)})
        entry[f"{attempt}_out_err"] = _err(out, ref_out)
        entry[f"{attempt}_grad_err"] = max(_err(t.grad, r) for t, r in zip((q, k, v), ref_grads))
        ok &= out.dtype == torch.bfloat16 and entry[f"{attempt}_grad_dtypes"] == ["torch.float32"]
        ok &= entry[f"{attempt}_out_err"] <= OUT_ATOL[torch.bfloat16] * 2
        ok &= entry[f"{attempt}_grad_err"] <= GRAD_ATOL[torch.bfloat16] * 2
    entry["ok"] = bool(ok)
    return entry


def check_other_ranks(name, device) -> dict:
    """bf16 inputs of 3 and 5 dims, as SDPA takes them ((H, S, D) and (2, B, H, S, D), GQA, causal): the output
    keeps the input's rank and matches float64, and so do the gradients."""
    entry = {"provider": name, "case": "3-D (H8 S513 D128) and 5-D (2 x B2 x Hq8/Hkv2 S513 D128) inputs, causal"}
    ok = True
    for label, q_shape, kv_shape in (("3d", (8, 513, 128), (8, 513, 128)),
                                     ("5d", (2, 2, 8, 513, 128), (2, 2, 2, 513, 128))):
        gen = torch.Generator().manual_seed(13)
        q, k, v = (torch.randn(shape, generator=gen).to(device, torch.bfloat16).requires_grad_()
                   for shape in (q_shape, kv_shape, kv_shape))
        dout = torch.randn(q_shape, generator=gen).to(device, torch.bfloat16)
        with cpattn.attention_provider(name):
            out = cpattn.attention_dispatch(q, k, v, is_causal=True, enable_gqa=q_shape != kv_shape)
        out.backward(dout)
        fold = lambda t: t.reshape(-1, *t.shape[-3:]) if t.dim() > 3 else t.unsqueeze(0)  # noqa: E731
        rq, rk, rv, rdout = (fold(t) for t in (q, k, v, dout))
        ref_out, _, ref_grads = reference_with_grads(rq, rk, rv, rdout, None, True)
        entry[f"{label}_out_shape_ok"] = tuple(out.shape) == q_shape
        entry[f"{label}_out_err"] = _err(fold(out), ref_out)
        entry[f"{label}_grad_err"] = max(_err(fold(t.grad), r) for t, r in zip((q, k, v), ref_grads))
        ok &= entry[f"{label}_out_shape_ok"] and entry[f"{label}_out_err"] <= OUT_ATOL[torch.bfloat16] * 2
        ok &= entry[f"{label}_grad_err"] <= GRAD_ATOL[torch.bfloat16] * 2
    entry["ok"] = bool(ok)
    return entry


def check_cuda_graph(name, device) -> dict:
    """Dispatch captured in a CUDA graph (as inference servers run it) after two eager warm-up calls, replayed on
    new values copied into the captured inputs: each replay matches float64 on those values."""
    entry = {"provider": name, "case": "CUDA graph capture and replay, bf16 B2 Hq8 Hkv2 S512 D128 causal"}
    static = list(make_qkv(2, 8, 2, 512, 512, 128, dtype=torch.bfloat16, device=device, seed=21))

    def attend():
        return cpattn.attention_dispatch(*static, is_causal=True, enable_gqa=True)
    with cpattn.attention_provider(name):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                attend()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attend()
    errors = []
    for seed in (22, 23):
        fresh = make_qkv(2, 8, 2, 512, 512, 128, dtype=torch.bfloat16, device=device, seed=seed)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        ref_out, _, _ = reference_with_grads(*fresh, torch.zeros_like(fresh[0]), None, True)
        errors.append(_err(out, ref_out))
    entry["replay_out_errs"] = errors
    entry["ok"] = bool(max(errors) <= OUT_ATOL[torch.bfloat16] * 2)
    return entry


def check_provider(name, provider, device, label=None, **options):
    """`options` go to attention_provider (autotune=True for 'auto'); `label` names the run in the report."""
    caps = provider.capabilities("cuda")
    report = {"provider": label or name, "available": provider.availability().ok, "version": provider.availability().version,
              "reason": provider.availability().reason, "cases": []}
    if not report["available"] or caps is None:
        return report
    for case in single_cases(provider, caps):
        b, hq, hkv, sq, sk, d = case["shape"]
        dtype = case["dtype"]
        entry = {"case": case["name"], "dtype": str(dtype).replace("torch.", "")}
        try:
            training = caps.training
            q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype=dtype, device=device, requires_grad=training)
            mask = build_mask(case["mask"], b, sq, sk, device)
            dout = torch.randn(b, hq, sq, d, device=device).to(dtype)
            ref_out, ref_lse, ref_grads = reference_with_grads(q, k, v, dout, mask, case["causal"])
            reasons = provider.reasons(make_call(q, k, v, mask, 0.0, case["causal"], None, hq != hkv))
            if reasons and training:  # e.g. no backward for this shape on this GPU: check the forward alone
                entry["refused_training"] = reasons
                training = False
                q, k, v = (t.detach() for t in (q, k, v))
                reasons = provider.reasons(make_call(q, k, v, mask, 0.0, case["causal"], None, hq != hkv))
            if reasons:
                entry["refused"] = reasons
                report["cases"].append(entry)
                continue
            with cpattn.attention_provider(name, **options):
                out = cpattn.attention_dispatch(q, k, v, attn_mask=mask, is_causal=case["causal"],
                                                enable_gqa=hq != hkv)
            entry["out_err"] = _err(out, ref_out)
            ok = entry["out_err"] <= OUT_ATOL[dtype] * 2
            if training:
                out.backward(dout)
                entry["grad_err"] = max(_err(t.grad, r) for t, r in zip((q, k, v), ref_grads))
                ok &= entry["grad_err"] <= GRAD_ATOL[dtype] * 2
            # The same call again: dispatch now runs the runner it cached at the first call, without checks.
            q2, k2, v2 = (t.detach().clone().requires_grad_(training) for t in (q, k, v))
            with cpattn.attention_provider(name, **options):
                out2 = cpattn.attention_dispatch(q2, k2, v2, attn_mask=mask, is_causal=case["causal"],
                                                 enable_gqa=hq != hkv)
            entry["cached_out_err"] = _err(out2, ref_out)
            ok &= entry["cached_out_err"] <= OUT_ATOL[dtype] * 2
            if training:
                out2.backward(dout)
                entry["cached_grad_err"] = max(_err(t.grad, r) for t, r in zip((q2, k2, v2), ref_grads))
                ok &= entry["cached_grad_err"] <= GRAD_ATOL[dtype] * 2
            call = make_call(q.detach(), k.detach(), v.detach(), mask, 0.0, case["causal"], None, hq != hkv)
            if caps.returns_lse:
                c_out, c_lse = provider.forward(call)
                entry["contract_out_err"] = _err(c_out, ref_out)
                entry["lse_err"] = _err(c_lse, ref_lse)
                entry["lse_dtype"] = str(c_lse.dtype)
                entry["lse_shape_ok"] = list(c_lse.shape) == [b, hq, sq]
                ok &= entry["lse_err"] <= LSE_ATOL and entry["lse_shape_ok"] and c_lse.dtype == torch.float32
                if caps.backward and training:
                    grads = provider.backward(call, dout, c_out, c_lse)
                    entry["contract_grad_err"] = max(_err(g, r) for g, r in zip(grads, ref_grads))
                    ok &= entry["contract_grad_err"] <= GRAD_ATOL[dtype] * 2
            entry["ok"] = bool(ok)
        except Exception as exc:
            entry["ok"] = False
            entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            entry["traceback"] = traceback.format_exc()[-3000:]
        report["cases"].append(entry)
        verdict = "ok" if entry.get("ok") else entry.get("refused") or "FAIL " + str(
            entry.get("error") or {k: v for k, v in entry.items() if k.endswith("err")})[:400]
        print(f"  {label or name:<20}{entry['case']:<50}{verdict}", flush=True)
    return report


def cp_cases(world, providers, extras=True, head_dims=(128,)) -> list:
    """The default context-parallel cases: per provider, each schedule it claims, causal where it can be, GQA 8:4
    at 256 tokens per rank, at each of `head_dims` (D=128 by default; others reach the kernels' head-dim padding);
    with `extras`, float32 shards under autocast and 5-D shards on its first schedule at the first head dim, the
    ring without GQA, and the ring with a replicated prefix (cp_replicated_prefix)."""
    from cp_harness import Case

    cases = []
    for name in providers:
        caps = cpattn.PROVIDERS[name].capabilities("cuda")
        dtype = "bfloat16" if torch.bfloat16 in caps.dtypes else "float16"
        schedules = ["ulysses", "allgather"] + (["ring"] if caps.returns_lse else [])
        for i, head_dim in enumerate(head_dims):
            for strategy in schedules:
                causal = strategy != "allgather" or caps.bool_mask
                grad = caps.training and (strategy != "ring" or caps.backward)
                cases.append(Case(provider=name, strategy=strategy, causal=causal, seq=256 * world, head_dim=head_dim,
                                  q_heads=8, kv_heads=4 if caps.gqa else 8, dtype=dtype, grad=grad,
                                  device="cuda", batch=1))
            if extras and i == 0:  # float32 shards under autocast(bf16), and 5-D shards, on the first schedule
                base = cases[-len(schedules)]
                cases.append(dataclasses.replace(base, dtype="float32", autocast=dtype))
                cases.append(dataclasses.replace(base, dims=5))
                # Ulysses in two head chunks (cpattn pipelines them only for large transfers): every rank's
                # query and KV heads cut in two
                cases.append(dataclasses.replace(base, q_heads=4 * world, kv_heads=(2 if caps.gqa else 4) * world,
                                                 head_chunks=2))
            if extras and caps.gqa and caps.backward and caps.training and i == 0:
                # the ring backward with as many KV heads as query heads (FA4 on sm90 then keeps one dQ
                # accumulator per rank: providers/fa4_rows.py), causal and not; and at 250 tokens per rank, where
                # zigzag halves start off the kernel's 64-row tiles and those steps take the per-block path
                ring = Case(provider=name, strategy="ring", causal=True, seq=256 * world, head_dim=head_dim,
                            q_heads=8, kv_heads=8, dtype=dtype, grad=True, device="cuda", batch=1)
                cases += [ring, dataclasses.replace(ring, causal=False), dataclasses.replace(ring, seq=250 * world)]
            if extras and caps.returns_lse and caps.backward and caps.training and i == 0:
                # joint attention: a 64-token prefix replicated on every rank, as a local block of the ring
                cases.append(Case(provider=name, strategy="ring", causal=False, seq=192 * world, prefix=64,
                                  head_dim=head_dim, q_heads=8, kv_heads=4 if caps.gqa else 8, dtype=dtype,
                                  grad=True, device="cuda", batch=1))
    return cases


def matrix_cases(world, providers, masks=False) -> list:
    """Every provider x schedule it claims at this world size, forward and backward where it trains:
    - causal and not (all-gather causal only where the provider takes a bool mask: it builds the causal mask);
    - GQA 8:4 (8:8 where the provider has no GQA) at 256 tokens per rank, D=128 (64 where that is its limit);
    - heads == sequence length (24 and 24, batch 2, D=64), so a (heads, sequence) mix-up cannot pass a shape check;
    - a mask where the provider takes one: bool with fully masked rows, or key padding; with `masks`, also a
      bool mask together with is_causal and an additive float mask;
    - at W=4, the hybrid schedule on a 2 x 2 (ring, ulysses) mesh."""
    from cp_harness import Case

    cases = []
    for name in providers:
        caps = cpattn.PROVIDERS[name].capabilities("cuda")
        dtype = "bfloat16" if torch.bfloat16 in caps.dtypes else "float16"
        head_dim = 128 if (caps.max_head_dim or 512) >= 128 else 64
        if caps.training and not trains_here(name, getattr(torch, dtype), head_dim):
            caps = dataclasses.replace(caps, training=False)  # e.g. no varlen backward on this GPU: forward only
        with_lse = ["ring"] + (["hybrid"] if world == 4 else []) if caps.returns_lse else []
        for strategy in ["ulysses", "allgather"] + with_lse:
            grad = caps.training and (strategy in ("ulysses", "allgather") or caps.backward)
            causal_options = (False, True) if strategy != "allgather" or caps.bool_mask else (False,)
            base = Case(provider=name, strategy=strategy, mesh=(2, 2) if strategy == "hybrid" else (),
                        seq=256 * world, head_dim=head_dim, q_heads=8, kv_heads=4 if caps.gqa else 8, dtype=dtype,
                        grad=grad, device="cuda", batch=1)
            cases += [dataclasses.replace(base, causal=causal) for causal in causal_options]
            cases.append(dataclasses.replace(base, q_heads=24, kv_heads=24, seq=24, head_dim=64, batch=2,
                                             causal=causal_options[-1]))
            mask = "empty_rows" if caps.bool_mask else "key_padding" if caps.key_padding_mask else None
            if mask:
                cases.append(dataclasses.replace(base, mask=mask, causal=False, batch=2, seq=64 * world))
            if masks and caps.bool_mask:  # a mask together with is_causal (folded into one mask where needed)
                cases.append(dataclasses.replace(base, mask="empty_rows", causal=True, batch=2, seq=64 * world))
            if masks and caps.additive_mask and (strategy != "allgather" or caps.bool_mask):
                cases.append(dataclasses.replace(base, mask="additive", causal=False, batch=2, seq=64 * world))
    return cases


def trains_here(name, dtype, head_dim) -> bool:
    """Whether the provider takes a call that needs gradients on this GPU (its capabilities are per device type,
    not per architecture: an FA4 release without a varlen backward on sm90, for one)."""
    q, k, v = make_qkv(1, 8, 4, 64, 64, head_dim, dtype=dtype, device="cuda", requires_grad=True)
    return not cpattn.PROVIDERS[name].reasons(make_call(q, k, v, None, 0.0, True, None, True))


REFUSALS = ("UnsupportedInputError", "InvalidArgumentError")


def cp_checks(worlds, on_progress=lambda results: None, only=None, extras=True, matrix=False, masks=False,
              head_dims=(128,)):
    """Run the cases of each world size on that many ranks on this GPU over gloo; a case is ok when its output and
    gradients are within the dtype's tolerance of float64, and `refused` when every rank raised cpattn's error for
    inputs it cannot take (recorded with the message, not counted as passed)."""
    from cp_harness import run_cases

    results = []
    providers = [n for n in (only or (list(cpattn.PROVIDERS) if matrix else CP_PROVIDERS))
                 if cpattn.PROVIDERS[n].availability().ok]
    providers = [n for n in providers if torch.cuda.get_device_capability() >= (
        cpattn.PROVIDERS[n].capabilities("cuda").min_compute_capability or (0, 0))]
    for world in worlds:
        cases = matrix_cases(world, providers, masks) if matrix else cp_cases(world, providers, extras, head_dims)
        if masks:  # the mask cases alone
            cases = [c for c in cases if c.mask in ("additive",) or (c.mask and c.causal)]
        started = time.time()
        outcomes = run_cases(world, cases, timeout=560)
        for case in cases:
            o = outcomes[case.name]
            computed_in = getattr(torch, case.autocast or case.dtype)
            tol_out, tol_grad = OUT_ATOL[computed_in], GRAD_ATOL[computed_in]
            ok = o.exception is None and o.errors.get("out", 1) <= tol_out * 2 and (
                not case.grad or max(o.errors.get(x, 1) for x in ("dq", "dk", "dv")) <= tol_grad * 2)
            ok &= o.errors.get("out_finite", 0) == 1.0
            ok &= o.stats.get("out_device") == "cuda"  # the case ran on the GPU, not on the harness's CPU default
            if case.autocast:
                ok &= o.stats.get("out_dtype") == str(computed_in)
            if case.dims != 4:
                ok &= o.stats.get("out_dims") == case.dims
            if case.head_chunks:  # each chunk moved its own q, k, v and out (and their gradients)
                ok &= o.stats.get("all_to_all") == (8 if case.grad else 4) * case.head_chunks
            refused = bool(o.rank_exceptions) and all(t in REFUSALS for t, _, _ in o.rank_exceptions)
            results.append({"world": world, "provider": case.provider, "schedule": case.strategy,
                            "head_chunks": case.head_chunks or None, "all_to_all": o.stats.get("all_to_all"),
                            "mesh": list(case.mesh), "causal": case.causal, "backward": case.grad,
                            "dtype": case.dtype, "autocast": case.autocast, "dims": case.dims,
                            "shape": [case.batch, case.q_heads, case.kv_heads, case.seq, case.head_dim],
                            "mask": case.mask, "errors": o.errors, "seconds": o.stats.get("seconds"),
                            "exception": o.exception, "refused": refused, "ok": bool(ok)})
            extra = (f" autocast={case.autocast}" if case.autocast else "") + (f" dims={case.dims}"
                                                                               if case.dims != 4 else "")
            extra += f" head_chunks={case.head_chunks}" if case.head_chunks else ""
            shape = "B{}xHq{}xHkv{}xS{}xD{}".format(*results[-1]["shape"])
            verdict = "ok" if ok else ("refused: " if refused else "FAIL ") + str(o.exception or o.errors)[:300]
            print(f"  W={world} {case.provider:<20}{case.strategy:<10}{shape:<26}causal={case.causal!s:<6}"
                  f"mask={case.mask} bwd={case.grad}{extra} {verdict}", flush=True)
        print(f"W={world}: {len(cases)} cases in {time.time() - started:.0f} s", flush=True)
        on_progress(results)
    return results


def packed_checks(worlds, on_progress=lambda rows: None) -> list[dict]:
    """flash_varlen_attention on shards of one packed stream (documents across shards), ranks on this one GPU over
    gloo, against float64; forward and backward where the library has a varlen backward here."""
    from cp_harness import packed_rank
    from reliability_helpers import run_ranks

    rows = []
    for world in worlds:
        for layout, causal in (("zigzag", True), ("contiguous", True), ("zigzag", False)):
            row = {"world": world, "layout": layout, "causal": causal}
            for grad in (True, False):
                result = run_ranks(world, packed_rank, (layout, causal, "auto", "cuda", None, grad), timeout=240)
                errors = [r for r in result.ranks if r.error is not None]
                if grad and errors and all(r.error_type == "UnsupportedInputError" for r in errors):
                    row["backward_refused"] = errors[0].error[:500]
                    continue  # e.g. no varlen backward on this GPU: check the forward alone
                row["backward"] = grad
                if errors:
                    row["ok"], row["error"] = False, f"{errors[0].error_type}: {errors[0].error}"[:1500]
                else:
                    row["errors"], row["stats"] = result.ranks[0].value
                    row["ok"] = row["errors"]["out"] < 3e-2 and all(
                        row["errors"].get(g, 0) < 5e-2 for g in ("dq", "dk", "dv"))
                break
            rows.append(row)
            on_progress(rows)
            print(f"  packed W={world} {layout:<11} causal={causal!s:<6} bwd={row.get('backward')} "
                  f"{'ok' if row.get('ok') else 'FAIL ' + str(row.get('error') or row.get('errors'))[:300]}",
                  flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--cp-worlds", type=int, nargs="*", default=[2, 3, 4])
    parser.add_argument("--providers", nargs="*", help="single-device check of these only (default all)")
    parser.add_argument("--cp-providers", nargs="*", help="context-parallel check of these only")
    parser.add_argument("--cp-matrix", action="store_true",
                        help="the full context-parallel matrix (matrix_cases) instead of the default cases")
    parser.add_argument("--cp-masks", action="store_true",
                        help="with --cp-matrix: only the matrix's extra mask cases (bool mask with is_causal, additive)")
    parser.add_argument("--cp-head-dims", type=int, nargs="*", default=[128],
                        help="head dims of the default context-parallel cases")
    parser.add_argument("--tag", default="")
    parser.add_argument("--packed-worlds", type=int, nargs="*", default=[],
                        help="flash_varlen_attention under CP with these world sizes (ranks on this GPU)")
    args = parser.parse_args()
    device = torch.device("cuda")
    start = time.time()
    gpu = torch.cuda.get_device_name()
    print(f"gpu check on {gpu}, torch {torch.__version__}", flush=True)
    single = [check_provider(n, p, device) for n, p in cpattn.PROVIDERS.items()
              if args.providers is None or n in args.providers]
    if args.providers is None or "auto" in args.providers:  # both ways of choosing: fixed order and timed
        from cpattn.providers import AUTO, AUTO_TUNED

        single += [check_provider("auto", AUTO, device),
                   check_provider("auto", AUTO_TUNED, device, label="auto autotune", autotune=True)]
    autocast = []  # and other input ranks
    for name in AUTOCAST_PROVIDERS:
        for check, what in ((check_autocast, "autocast bf16 from float32"), (check_other_ranks, "3-D and 5-D"),
                            (check_cuda_graph, "CUDA graph capture and replay")):
            if args.providers is None or name in args.providers:
                availability = cpattn.get_provider(name).availability()
                if not availability.ok:
                    autocast.append({"provider": name, "case": what, "skipped": availability.reason})
                    continue
                try:
                    autocast.append(check(name, device))
                except Exception as exc:  # record, keep going
                    autocast.append({"provider": name, "case": what, "ok": False,
                                     "error": f"{type(exc).__name__}: {exc}"[:400]})
                print(f"  {name:18s}  {what}: {'ok' if autocast[-1].get('ok', True) else 'FAIL'}", flush=True)
    result = {
        "device": gpu, "capability": "sm%d%d" % torch.cuda.get_device_capability(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"), "single_device": single, "autocast": autocast,
        "context_parallel_gloo_one_gpu": [],
    }
    os.makedirs(args.out, exist_ok=True)
    tag = gpu.replace(" ", "_").replace("/", "_")
    path = os.path.join(args.out, f"gpu_check_{tag}{args.tag}.json")

    def save(cp_results):  # after each world size, so a run cut short keeps what it measured
        result["context_parallel_gloo_one_gpu"] = cp_results
        result["seconds"] = round(time.time() - start, 1)
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)

    save([])
    cp = cp_checks(args.cp_worlds, save, args.cp_providers, matrix=args.cp_matrix,
                   masks=args.cp_masks, head_dims=args.cp_head_dims) if args.cp_worlds else []
    if args.packed_worlds:
        def save_packed(rows):  # after each case, so a run cut short keeps what it checked
            result["packed_cp_gloo_one_gpu"] = rows
            save(cp)
        cp = cp + packed_checks(args.packed_worlds, save_packed)
    n_fail = sum(not c.get("ok", True) for r in single for c in r["cases"] if "refused" not in c)
    n_fail += sum(not r["ok"] and not r.get("refused") for r in cp) + sum(not r.get("ok", True) for r in autocast)
    n_refused = sum(bool(r.get("refused")) for r in cp)
    print(f"wrote {path}; failures: {n_fail}; refused: {n_refused}", flush=True)


if __name__ == "__main__":
    main()
