"""Run batches of context-parallel cases in W gloo processes and compare with the float64 reference.

One spawn per world size runs many cases (process start-up dominates on small CPUs). Every case builds
the whole problem from a seed on every rank, shards it with cpattn.shard_sequence, runs forward and
backward through cpattn.attention_dispatch under attention_provider(..., cp_mesh=mesh), gathers output and
gradients, and reports on rank 0 the max error against the float64 reference of the unsharded problem.
Error cases report, from every rank, the exception each one raised and how long it took.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field
from unittest import mock

import torch
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Case:
    provider: str = "native"
    strategy: str = "ring"
    layout: str = "zigzag"
    causal: bool = True
    mask: str | None = None  # None, "bool", "additive", "key_padding", "empty_rows"
    batch: int = 2
    q_heads: int = 4
    kv_heads: int = 2
    seq: int = 14
    head_dim: int = 16
    dtype: str = "float32"
    grad: bool = True
    dropout: float = 0.0
    mesh: tuple = ()  # () = 1-D over all ranks; (R, U) = 2-D ("ring", "ulysses")
    standin: str | None = None  # a stand-in library to install first: "fa4", "fa2", "sage1", "sage2", "xformers"
    fault: str | None = None  # error cases: what to break on one rank
    device: str = "cpu"  # "cuda": every rank on cuda:0, gloo (several ranks on one GPU), mesh = the world group
    prefix: int = 0  # replicated leading tokens (joint attention): seq counts the sharded tokens only
    suffix: int = 0  # replicated trailing tokens (SD3's joint attention), likewise
    autocast: str | None = None  # run the forward under torch.autocast with this dtype (inputs stay in dtype)
    dims: int = 4  # call dispatch with 3-D (batch must be 1) or 5-D (a leading 1) views of the shards
    head_chunks: int = 0  # Ulysses head chunks asked for whatever the size (0: cpattn's own choice by size)
    window: tuple | None = None  # window=(left, right) passed to attention_dispatch
    softcap: float | None = None
    sinks: bool = False  # (query heads,) sink logits, a parameter replicated on every rank
    kv_len: int = 0  # cross-attention: key/value of this length, whole on every rank (0: self-attention)
    kv_replicated: bool = False  # pass kv_replicated=True

    @property
    def name(self) -> str:
        parts = [f"{k}={v}" for k, v in asdict(self).items() if v != getattr(Case, k, None)]
        return ",".join(parts) or "default"


@dataclass
class Outcome:
    errors: dict = field(default_factory=dict)  # what -> max abs error (rank 0)
    stats: dict = field(default_factory=dict)
    exception: str | None = None  # rank 0's exception type and message
    rank_exceptions: list = field(default_factory=list)  # (type, message, seconds) per rank
    rank_stats: list = field(default_factory=list)  # every rank's stats, by rank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_mask(case: Case, gen) -> torch.Tensor | None:
    b, s = case.batch, case.seq
    keys = case.kv_len or s  # cross-attention: the replicated keys
    if case.mask is None:
        return None
    if case.mask == "bool":
        return torch.rand(b, 1, s, keys, generator=gen) < 0.7
    if case.mask == "additive":
        return torch.randn(b, case.q_heads, s, keys, generator=gen, dtype=torch.float64)
    if case.mask == "key_padding":
        m = torch.ones(b, 1, 1, keys, dtype=torch.bool)
        m[0, ..., keys - max(1, keys // 3):] = False
        return m
    if case.mask == "mask_mod":  # the reference gets the callable's full mask; ranks get the callable
        import cpattn

        return cpattn.masks.materialize_mask_mod(_mask_mod, b, case.q_heads, torch.arange(s), torch.arange(s))
    if case.mask == "documents":  # packed documents; boundaries fall inside shards
        return cpattn_document_mask(_doc_bounds(s)).expand(b, 1, s, s)
    if case.mask == "empty_rows":  # some query rows see no key at all
        m = torch.rand(b, 1, s, keys, generator=gen) < 0.7
        m[:, :, ::3] = False
        return m
    raise ValueError(case.mask)


_MASK_MOD_CELLS: list[int] = []  # (query x key) grid sizes _mask_mod was evaluated on, in this process


def _mask_mod(b, h, q_idx, kv_idx):
    """A head-dependent sliding window (flex-style): wrong global positions or head offsets change it."""
    _MASK_MOD_CELLS.append(q_idx.numel() * kv_idx.numel())
    return (q_idx - kv_idx).abs() <= 2 + h


def _doc_bounds(s: int) -> list[int]:
    return sorted({0, min(s, 3), s // 2 + 1, s})


def cpattn_document_mask(cu, *args, **kwargs):
    import cpattn

    return cpattn.document_mask(cu, *args, **kwargs)


def _problem(case: Case):
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))  # same on every rank
    shape = lambda h, n=case.seq: (case.batch, h, n, case.head_dim)  # noqa: E731
    q = torch.randn(shape(case.q_heads), generator=gen, dtype=torch.float64)
    k = torch.randn(shape(case.kv_heads, case.kv_len or case.seq), generator=gen, dtype=torch.float64)
    v = torch.randn(shape(case.kv_heads, case.kv_len or case.seq), generator=gen, dtype=torch.float64)
    dout = torch.randn(shape(case.q_heads), generator=gen, dtype=torch.float64)
    return q, k, v, dout, _make_mask(case, gen)


def _sinks(case: Case) -> torch.Tensor | None:
    """The case's sink logits (float64, the same on every rank), from their own generator so that a case's other
    draws do not depend on whether it has sinks; spread wide enough that some rows' sink dominates."""
    if not case.sinks:
        return None
    gen = torch.Generator().manual_seed(zlib.crc32(("sinks " + case.name).encode()))
    return 2.0 * torch.randn(case.q_heads, generator=gen, dtype=torch.float64)


def _mods(case: Case, rank: int, sinks: torch.Tensor | None) -> dict:
    """The score-modification keywords this rank passes (faults: rank 0 passes other ones)."""
    window, softcap = case.window, case.softcap
    if case.fault == "window" and rank == 0:
        window = (window[0] + 1, window[1])
    if case.fault == "softcap" and rank == 0:
        softcap = 2 * softcap
    if case.fault == "sinks" and rank == 0:
        sinks = None
    replicated = case.kv_replicated or (case.fault == "replicated" and rank == 0)
    return dict(window=window, softcap=softcap, sinks=sinks, kv_replicated=replicated)


def _replicated_grad(grad: torch.Tensor) -> torch.Tensor:
    """The gradient of a replicated input or parameter: every rank's share, summed (as a gradient all-reduce)."""
    import torch.distributed as dist

    total = grad.to("cpu", torch.float64, copy=True)
    dist.all_reduce(total)
    return total


def _mesh(case: Case, world: int):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if case.mesh:  # gloo groups; on "cuda" they carry the GPU tensors (point-to-point staged through CPU)
        return init_device_mesh("cpu", case.mesh, mesh_dim_names=("ring", "ulysses"))
    if case.device == "cuda":
        return dist.group.WORLD  # a ProcessGroup is a valid cp_mesh; gloo with CUDA tensors
    return init_device_mesh("cpu", (world,))


def _install_standin(kind: str) -> None:
    """Put a named stand-in library (tests/support/standins/) in sys.modules in this worker and make cpattn probe again.
    kind: "fa4", "fa2" (flash-attn), "sage1" (sageattention 1.0.6), "sage2" (sageattention 2.x), "xformers"."""
    import cpattn

    sys.path.insert(0, os.path.join(HERE, "standins"))
    if kind in ("fa2", "fa4"):
        import flash_attn_standin as standin

        modules = standin.fa4_modules() if kind == "fa4" else standin.fa2_modules()
        for name in standin.MODULE_NAMES:
            sys.modules[name] = modules.get(name)
        names = ("flash", "flash_varlen")
    elif kind in ("sage1", "sage2"):
        import sageattention_standin as standin

        sys.modules["sageattention"] = standin.build("1.0.6" if kind == "sage1" else "2.2.0")
        names = ("sage", "sage_varlen", "_sage_qk_int8_pv_fp16_triton")
    elif kind == "xformers":
        import xformers_standin as standin

        sys.modules.update(standin.build("0.0.35"))
        names = ("xformers",)
    else:
        raise ValueError(kind)
    for name in names:
        provider = cpattn.get_provider(name)
        provider._availability = None
        if hasattr(provider, "_generation"):
            provider._generation = None


def _run_prefix_case(case: Case, rank: int, world: int, mesh) -> Outcome:
    """Joint attention: P text tokens before and X after a sharded sequence, on every rank. The reference is full
    attention over all P + S + X tokens; replicated outputs must be whole on every rank, their gradients summed
    over ranks."""
    import torch.distributed as dist

    import cpattn
    from cpattn.reference import reference_attention

    full = Case(**{**asdict(case), "seq": case.seq + case.prefix + case.suffix, "prefix": 0, "suffix": 0})
    q, k, v, dout, _ = _problem(full)
    dtype, p, end = getattr(torch, case.dtype), case.prefix, case.prefix + case.seq
    text = lambda t: torch.cat([t[:, :, :p], t[:, :, end:]], 2)  # noqa: E731  the replicated rows, in order
    local = lambda t: torch.cat([t[:, :, :p], cpattn.shard_sequence(t[:, :, p:end], mesh, 2, case.layout),  # noqa
                                 t[:, :, end:]], 2)
    device = torch.device(case.device)
    ql, kl, vl = (local(t).to(device=device, dtype=dtype).requires_grad_(case.grad) for t in (q, k, v))
    dout_l = local(dout).clone()
    local_end = dout_l.shape[2] - case.suffix
    dout_l[:, :, :p] /= world  # the replicated tokens' loss is computed on every rank: each contributes a W-th
    dout_l[:, :, local_end:] /= world
    dout_l = dout_l.to(device)
    sinks = _sinks(case)
    sinks_l = None if sinks is None else sinks.to(device=device, dtype=dtype, copy=True).requires_grad_(case.grad)
    with cpattn.attention_provider(case.provider, cp_mesh=mesh, cp_strategy=case.strategy, cp_layout=case.layout,
                                   cp_replicated_prefix=p, cp_replicated_suffix=case.suffix,
                                   cp_timeout=20) as state:
        out = cpattn.attention_dispatch(ql, kl, vl, enable_gqa=case.q_heads != case.kv_heads,
                                        **_mods(case, rank, sinks_l))
        if case.grad:
            out.backward(dout_l.to(dtype))
    ref_in = [t.clone().requires_grad_(case.grad) for t in (q, k, v)]
    ref_sinks = None if sinks is None else sinks.clone().requires_grad_(case.grad)
    ref_out, _ = reference_attention(*ref_in, window=case.window, softcap=case.softcap, sinks=ref_sinks)
    result = Outcome(stats=dict(state.cp.stats))
    image = cpattn.gather_sequence(out[:, :, p:local_end].detach(), mesh, 2, case.layout).cpu()
    local_text = lambda t: torch.cat([t[:, :, :p], t[:, :, local_end:]], 2)  # noqa: E731
    result.errors["out"] = max((local_text(out).double().cpu() - text(ref_out)).abs().max().item(),
                               (image.double() - ref_out[:, :, p:end]).abs().max().item())
    result.stats["out_device"] = out.device.type
    result.errors["out_finite"] = float(torch.isfinite(out).all())
    if case.grad:
        ref_out.backward(dout)
        for name, t, ref in zip(("dq", "dk", "dv"), (ql, kl, vl), ref_in):
            summed = local_text(t.grad).to("cpu", torch.float64, copy=True)
            dist.all_reduce(summed)  # replicated inputs: per-rank contributions sum to the gradient
            img = cpattn.gather_sequence(t.grad[:, :, p:local_end], mesh, 2, case.layout).double().cpu()
            result.errors[name] = max((summed - text(ref.grad)).abs().max().item(),
                                      (img - ref.grad[:, :, p:end]).abs().max().item())
        if sinks is not None:
            result.errors["dsinks"] = (_replicated_grad(sinks_l.grad) - ref_sinks.grad).abs().max().item()
    return result


def _with_dims(t: torch.Tensor, dims: int) -> torch.Tensor:
    """A view of a (B, H, S, D) shard with `dims` dims, as SDPA takes them: (H, S, D) for B=1, or (1, B, H, S, D)."""
    return t.squeeze(0) if dims == 3 else t.unsqueeze(0)


def _run_case(case: Case, rank: int, world: int, meshes: dict) -> Outcome:
    import cpattn
    from cpattn.reference import reference_attention

    if case.standin:
        _install_standin(case.standin)
    if (case.mesh, case.device) not in meshes:  # built once per process: every rank builds them in the same order
        meshes[(case.mesh, case.device)] = _mesh(case, world)
    mesh = meshes[(case.mesh, case.device)]
    if case.prefix or case.suffix:
        return _run_prefix_case(case, rank, world, mesh)
    dtype = getattr(torch, case.dtype)
    q, k, v, dout, mask = _problem(case)
    shard = lambda t: cpattn.shard_sequence(t, mesh, 2, case.layout)  # noqa: E731
    device = torch.device(case.device)
    kv_local = (lambda t: t.clone()) if case.kv_len else shard  # cross-attention: key/value whole on every rank
    ql = shard(q).to(device=device, dtype=dtype).requires_grad_(case.grad)
    kl, vl = (kv_local(t).to(device=device, dtype=dtype).requires_grad_(case.grad) for t in (k, v))
    sinks = _sinks(case)
    sinks_l = None if sinks is None else sinks.to(device=device, dtype=dtype, copy=True).requires_grad_(case.grad)
    if case.fault == "key_length" and rank == 0:
        kl, vl = (t.detach()[:, :, :-1].clone().requires_grad_(case.grad) for t in (kl, vl))
    mask_l = None
    if case.mask == "mask_mod":
        mask_l = _mask_mod
        _MASK_MOD_CELLS.clear()
    elif mask is not None:
        mask_l = mask if mask.shape[2] == 1 else shard(mask)
        mask_l = (mask_l if mask_l.dtype == torch.bool else mask_l.to(dtype)).to(device)
    if case.fault == "mask_keys":  # every rank: a mask one key short of the keys
        mask_l = mask_l[..., :-1]
    if case.fault == "head_dim" and rank == 0:
        ql, kl, vl = (t.detach()[..., :-2].clone().requires_grad_(case.grad) for t in (ql, kl, vl))
    if case.fault == "length" and rank == 0:
        ql, kl, vl = (t.detach()[:, :, :-1].clone().requires_grad_(case.grad) for t in (ql, kl, vl))
    if case.fault == "provider" and rank == world - 1:
        case = Case(**{**asdict(case), "provider": "_native_math"})
    autocast = torch.autocast(case.device, dtype=getattr(torch, case.autocast or "bfloat16"),
                              enabled=case.autocast is not None)
    import cpattn.cp.context as cp_context

    chunks = (mock.patch.object(cp_context, "head_chunks_for", lambda *_: case.head_chunks) if case.head_chunks
              else contextlib.nullcontext())
    with chunks, cpattn.attention_provider(case.provider, cp_mesh=mesh, cp_strategy=case.strategy,
                                           cp_layout=case.layout, cp_timeout=20) as state:
        with autocast:  # the forward only, as torch.autocast's documentation asks
            args = (ql, kl, vl) if case.dims == 4 else tuple(_with_dims(t, case.dims) for t in (ql, kl, vl))
            out = cpattn.attention_dispatch(*args, attn_mask=mask_l, is_causal=case.causal,
                                            dropout_p=case.dropout, enable_gqa=case.q_heads != case.kv_heads,
                                            **_mods(case, rank, sinks_l))
            result_dims = out.dim()
            out = out.reshape(ql.shape[:-1] + out.shape[-1:])
        if case.grad:
            out.backward(shard(dout).to(device=device, dtype=dtype))
    gather = lambda t: cpattn.gather_sequence(t, mesh, 2, case.layout)  # noqa: E731
    if case.mask == "documents":  # the local-rows helper must equal this rank's rows of the full mask
        local = cpattn.document_mask(_doc_bounds(case.seq), mesh, case.layout)
        doc_mask_ok = torch.equal(local.expand_as(mask_l).cpu(), mask_l.cpu())
    result = Outcome(stats=dict(state.cp.stats) if state.cp is not None else {})
    result.stats["fused_grad_adds"] = len(_FUSED_GRAD_ADDS)  # since the process started
    if case.mask == "mask_mod":
        result.stats["mask_mod_max_cells"] = max(_MASK_MOD_CELLS)
    if case.mask == "documents":
        result.errors["document_mask_equal"] = float(doc_mask_ok)
    ref_in = [t.clone().requires_grad_(case.grad) for t in (q, k, v)]
    ref_sinks = None if sinks is None else sinks.clone().requires_grad_(case.grad)
    ref_out, _ = reference_attention(*ref_in, mask, case.causal, window=case.window, softcap=case.softcap,
                                     sinks=ref_sinks)
    full_out = gather(out).cpu()
    result.errors["out"] = (full_out.double() - ref_out).abs().max().item()
    result.errors["out_finite"] = float(torch.isfinite(full_out).all())
    result.stats["out_dtype"] = str(out.dtype)
    result.stats["out_device"] = out.device.type
    result.stats["out_dims"] = result_dims
    if case.grad:
        ref_out.backward(dout)
        for name, local, ref in zip(("dq", "dk", "dv"), (ql, kl, vl), ref_in):
            whole = _replicated_grad(local.grad) if case.kv_len and name != "dq" else gather(local.grad)
            result.errors[name] = (whole.cpu().double() - ref.grad).abs().max().item()
            result.stats[f"{name}_dtype"] = str(local.grad.dtype)
        if sinks is not None:
            result.errors["dsinks"] = (_replicated_grad(sinks_l.grad) - ref_sinks.grad).abs().max().item()
    return result


_FUSED_GRAD_ADDS: list = []


def _use_triton_kernels_on_cpu() -> None:
    """For tests/support/gradsum_kernel_check.py (TRITON_INTERPRET=1): the ring's Triton kernels run on these CPU ranks'
    tensors in Triton's interpreter, and the gradient adds are counted (reported as stats["fused_grad_adds"])."""
    import cpattn.ops.gradsum
    import cpattn.ops.merge

    add = cpattn.ops.gradsum._fused_add()

    def counted(*args):
        _FUSED_GRAD_ADDS.append(1)
        add(*args)

    cpattn.ops.gradsum._fuse_on = lambda part: True
    cpattn.ops.gradsum._fused_add = lambda: counted
    cpattn.ops.merge._fuse_on = lambda acc_out: True


def _worker(rank: int, world: int, port: int, cases: list, queue) -> None:
    import torch.distributed as dist

    if os.environ.get("CPATTN_TEST_TRITON_ON_CPU") == "1":
        _use_triton_kernels_on_cpu()
    # The checks' shards are far below the work per step from which a ring backward takes a second CUDA stream
    # (cpattn/cp/streams.py): lowered here so that GPU cases run the two-stream path, as large shards do.
    import cpattn.cp.streams

    cpattn.cp.streams.MIN_STEP_WORK = 0
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    meshes: dict = {}
    for case in cases:
        start = time.monotonic()
        try:
            outcome = _run_case(case, rank, world, meshes)
        except Exception as exc:  # reported, asserted on by the test
            outcome = Outcome(exception=f"{type(exc).__name__}: {exc}")
            outcome.rank_exceptions = [(type(exc).__name__, str(exc), time.monotonic() - start)]
            if os.environ.get("CPATTN_TEST_TRACEBACK"):
                traceback.print_exc()
        outcome.stats["seconds"] = round(time.monotonic() - start, 3)
        queue.put((rank, case.name, outcome))
    dist.barrier()
    dist.destroy_process_group()


def run_cases(world: int, cases: list[Case], timeout: float = 400.0) -> dict[str, Outcome]:
    """Run `cases` on `world` gloo ranks; returns case name -> Outcome (rank 0's, with every rank's exception)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cases, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    expected = world * len(cases)
    results: dict[str, Outcome] = {}
    per_rank: dict[str, list] = {}
    stats_by_rank: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    got = 0
    while got < expected:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if not any(p.is_alive() for p in procs):
                break
            time.sleep(0.05)
            continue
        rank, name, outcome = queue.get()
        got += 1
        per_rank.setdefault(name, []).extend(outcome.rank_exceptions or [(None, None, 0.0)])
        stats_by_rank.setdefault(name, {})[rank] = outcome.stats
        if rank == 0:
            results[name] = outcome
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
    for name, outcome in results.items():
        outcome.rank_exceptions = per_rank.get(name, [])
        outcome.rank_stats = [stats for _, stats in sorted(stats_by_rank.get(name, {}).items())]
    if got < expected:
        missing = [c.name for c in cases if c.name not in results]
        raise TimeoutError(f"{world}-rank run finished {got}/{expected} case reports; missing: {missing[:5]}")
    return results


def problems(outcome: Outcome, case: Case, out_tol: dict, grad_tol: dict) -> list[str]:
    """What is wrong with one case's outcome against float64: the exception it raised, or each error over the
    tolerance of the case's dtype (`out_tol`, `grad_tol`: dtype -> absolute tolerance), gradients where the case
    takes them (dsinks with sinks). NaN errors fail."""
    if outcome.exception is not None:
        return [outcome.exception.splitlines()[0]]
    dtype = getattr(torch, case.dtype)
    errors, found = outcome.errors, []
    if errors["out_finite"] != 1.0:
        found.append("non-finite output")
    if errors["out"] > out_tol[dtype]:
        found.append(f"out error {errors['out']:.3g} > {out_tol[dtype]}")
    grads = (("dq", "dk", "dv") + (("dsinks",) if case.sinks else ())) if case.grad else ()
    for name in grads:
        if not errors[name] <= grad_tol[dtype]:
            found.append(f"{name} error {errors[name]:.3g} > {grad_tol[dtype]}")
    return found


# -- packed (varlen) streams under context parallelism ------------------------------------------------------------

PACKED_BOUNDS = [0, 5, 6, 17, 17, 31]  # 31 tokens: not divisible by 2W; an empty document; documents cross shards
PACKED_HEADS = (4, 2, 16)  # query heads, key/value heads, head dim


def _packed_problem(bounds, heads):  # a packed stream of documents `bounds`
    hq, hkv, d = heads
    gen = torch.Generator().manual_seed(11)
    total = bounds[-1]
    q = torch.randn(total, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(total, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(total, hkv, d, generator=gen, dtype=torch.float64)
    dout = torch.randn(total, hq, d, generator=gen, dtype=torch.float64)
    return q, k, v, dout


def _packed_reference(q, k, v, dout, causal, bounds):  # float64, SDPA layout with a document mask
    import cpattn

    doc = torch.bucketize(torch.arange(bounds[-1]), torch.tensor(bounds[1:]), right=True)
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= torch.ones_like(mask).tril()
    sdpa = [t.clone().unsqueeze(0).transpose(1, 2).requires_grad_() for t in (q, k, v)]
    out, _ = cpattn.reference_attention(*sdpa, mask, False)
    out.backward(dout.unsqueeze(0).transpose(1, 2))
    packed = lambda t: t.squeeze(0).transpose(0, 1)  # noqa: E731
    return packed(out.detach()), [packed(t.grad) for t in sdpa]


def documents_reference(q, k, v, dout, bounds, causal, window=None, softcap=None, sinks=None):
    """float64 (out, [dq, dk, dv], dsinks or None) of a packed stream, one document at a time: each document is
    its own call of cpattn.reference_attention (its window, softcap and sinks in its own positions), so the
    reference knows nothing of how the code under test splits or masks the stream."""
    import cpattn

    leaves = [t.detach().double().clone().requires_grad_() for t in (q, k, v)]
    sink_leaf = None if sinks is None else sinks.detach().double().clone().requires_grad_()
    bhsd = lambda t: t.unsqueeze(0).transpose(1, 2)  # noqa: E731
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            out, _ = cpattn.reference_attention(*(bhsd(t[a:b]) for t in leaves), None, causal, window=window,
                                                softcap=softcap, sinks=sink_leaf)
            outs.append(out[0].transpose(0, 1))
    out = torch.cat(outs) if outs else leaves[0].new_zeros(0, q.shape[1], v.shape[-1])
    out.backward(dout.double())
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return out.detach(), grads, (None if sink_leaf is None else sink_leaf.grad)


def packed_rank(rank, world, payload):
    """One rank of a packed-stream case (run with reliability_helpers.run_ranks); returns rank 0's max errors
    against float64 and the CP stats. payload: layout, causal, cp_strategy, device ("cpu", or "cuda": every
    rank on the one GPU over gloo), stand-in library to install or None, whether to run backward; optionally
    document bounds and (query heads, key/value heads, head dim), PACKED_BOUNDS and PACKED_HEADS by default."""
    import torch.distributed as dist

    import cpattn

    layout, causal, strategy, device, standin, grad, *shape = payload
    bounds, heads = shape if shape else (PACKED_BOUNDS, PACKED_HEADS)
    if standin:
        _install_standin(standin)
    mesh = dist.group.WORLD  # a ProcessGroup is a valid cp_mesh (gloo, CPU or CUDA tensors)
    q, k, v, dout = _packed_problem(bounds, heads)
    shard = lambda t: cpattn.shard_sequence(t, mesh, 0, layout)  # noqa: E731
    ql, kl, vl = (shard(t).to(device=device, dtype=torch.bfloat16).requires_grad_(grad) for t in (q, k, v))
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    with cpattn.attention_provider("flash_varlen", cp_mesh=mesh, cp_layout=layout, cp_strategy=strategy,
                                   cp_timeout=20) as state:
        out = cpattn.flash_varlen_attention(ql, kl, vl, cu, cu, longest, longest, is_causal=causal)
        if grad:
            out.backward(shard(dout).to(device=device, dtype=torch.bfloat16))
    gather = lambda t: cpattn.gather_sequence(t, mesh, 0, layout).double().cpu()  # noqa: E731
    ref_out, ref_grads = _packed_reference(q, k, v, dout, causal, bounds)
    errors = {"out": (gather(out.detach()) - ref_out).abs().max().item()}
    for name, local, ref in zip(("dq", "dk", "dv"), (ql, kl, vl), ref_grads):
        if grad:
            errors[name] = (gather(local.grad) - ref).abs().max().item()
    return errors, dict(state.cp.stats)


# -- packed streams sharded by documents (cpattn.packed.shard_packed, the packed ring) -----------------------------


@dataclass(frozen=True)
class PackedCase:
    """One packed call on a stream sharded by documents. api: "packed" (cpattn.packed.packed_attention on
    `provider`) or "flash_varlen" (flash_varlen_attention(..., sharding="documents"))."""

    bounds: tuple
    causal: bool = True
    provider: str = "flash_varlen"
    api: str = "packed"
    strategy: str = "auto"
    heads: tuple = PACKED_HEADS  # query heads, key/value heads, head dim
    dtype: str = "bfloat16"
    grad: bool = True
    seed: int = 0
    window: tuple | None = None  # per document, (left, right)
    softcap: float | None = None
    sinks: bool = False  # (query heads,) sink logits, a parameter replicated on every rank
    shard: str = "documents"  # fault cases: "sequence" shards with cpattn.shard_sequence instead
    fault: str | None = None  # "window": rank 0 passes another window; "reversed": rank 0 reverses its tokens
    positions: bool = False  # pass position_ids: the layout's (packed_position_ids), reversed with the tokens
    mesh: tuple | None = None  # (ring, ulysses): a 2-D DeviceMesh, the hybrid schedule; None: the whole world 1-D
    library: str = "fa2"  # the flash-attn stand-in the flash providers run on: "fa2", or "fa4" (native sinks)


def _documents_problem(case: PackedCase):
    """q, k, v, dout of the whole stream, float64 values that the case's dtype holds exactly (the reference then
    sees the very inputs the kernels see)."""
    hq, hkv, d = case.heads
    gen = torch.Generator().manual_seed(case.seed)
    total = case.bounds[-1]
    dtype = getattr(torch, case.dtype)
    return tuple(torch.randn((total, h, d), generator=gen, dtype=torch.float64).to(dtype).double()
                 for h in (hq, hkv, hkv, hq))


def _documents_sinks(case: PackedCase) -> torch.Tensor | None:
    """The case's sink logits, float64 values its dtype holds (the same on every rank), spread wide enough that
    the sink dominates some rows."""
    if not case.sinks:
        return None
    gen = torch.Generator().manual_seed(zlib.crc32(f"sinks {case.seed} {case.bounds}".encode()))
    return (2.0 * torch.randn(case.heads[0], generator=gen, dtype=torch.float64)).to(getattr(torch, case.dtype)).double()


def _case_window(case: PackedCase, rank: int):
    if case.fault == "window" and rank == 0:
        return (case.window[0] + 1, case.window[1])
    return case.window


def _run_documents_case(case: PackedCase, mesh) -> dict:
    import torch.distributed as dist

    import cpattn
    from cpattn import packed

    cu = torch.tensor(case.bounds, dtype=torch.int32)
    dtype = getattr(torch, case.dtype)
    q, k, v, dout = _documents_problem(case)
    sinks = _documents_sinks(case)
    sink_leaf = None if sinks is None else sinks.to(dtype).requires_grad_(case.grad)
    window = _case_window(case, dist.get_rank())
    shard = lambda t: packed.shard_packed(t, cu, mesh)  # noqa: E731
    if case.shard == "sequence":
        shard = lambda t: cpattn.shard_sequence(t, mesh, 0)  # noqa: E731
    if case.fault == "reversed" and dist.get_rank() == 0:  # the layout's lengths, another order: its positions too
        shard = lambda t, made=shard: made(t).flip(0)  # noqa: E731
    ql, kl, vl = (shard(t).to(dtype).requires_grad_(case.grad) for t in (q, k, v))
    positions = None
    if case.positions:
        starts = torch.tensor(case.bounds[:-1]).repeat_interleave(torch.tensor(case.bounds).diff())
        positions = shard(torch.arange(case.bounds[-1]) - starts)  # what a model sharding its tokens alike uses
    longest = max(b - a for a, b in zip(case.bounds, case.bounds[1:]))
    with cpattn.attention_provider(case.provider, cp_mesh=mesh, cp_strategy=case.strategy, cp_timeout=20) as state:
        mods = dict(window=window, softcap=case.softcap, sinks=sink_leaf, position_ids=positions)
        if case.api == "flash_varlen":
            sharding = "sequence" if case.shard == "sequence" else "documents"
            out = cpattn.flash_varlen_attention(ql, kl, vl, cu, cu, longest, longest, is_causal=case.causal,
                                                sharding=sharding, **mods)
        else:
            out = packed.packed_attention(ql, kl, vl, cu, is_causal=case.causal, **mods)
        forward_stats = dict(state.cp.stats)
        if case.grad:
            out.backward(shard(dout).to(dtype))
    gather = lambda t: packed.gather_packed(t, cu, mesh).double()  # noqa: E731
    if case.shard == "sequence":
        gather = lambda t: cpattn.gather_sequence(t, mesh, 0).double()  # noqa: E731
    ref_out, ref_grads, ref_dsinks = documents_reference(q, k, v, dout, list(case.bounds), case.causal,
                                                         case.window, case.softcap, sinks)
    gathered = gather(out.detach())
    errors = {"out": (gathered - ref_out).abs().max().item(), "nonfinite": float(not gathered.isfinite().all())}
    if case.grad:
        for name, local, ref in zip(("dq", "dk", "dv"), (ql, kl, vl), ref_grads):
            errors[name] = (gather(local.grad) - ref).abs().max().item()
        if sink_leaf is not None:  # a replicated parameter: the ranks' shares, summed as the all-reduce does
            errors["dsinks"] = (_replicated_grad(sink_leaf.grad) - ref_dsinks).abs().max().item()
    errors["position_ids"] = errors["local_cu_seqlens_end"] = 0.0
    if case.shard == "documents":  # the document layout's helpers, on the shards it made
        positions = packed.gather_packed(packed.packed_position_ids(cu, mesh).view(-1, 1), cu, mesh).view(-1)
        starts = torch.tensor(case.bounds[:-1]).repeat_interleave(torch.tensor(case.bounds).diff())
        errors["position_ids"] = float((positions.long() != torch.arange(case.bounds[-1]) - starts).sum())
        local_cu = packed.packed_cu_seqlens(cu, mesh)
        errors["local_cu_seqlens_end"] = float(local_cu[-1].item() != ql.shape[0])
    return {"errors": errors, "stats": dict(state.cp.stats), "forward_stats": forward_stats,
            "local_len": ql.shape[0]}


def packed_documents_rank(rank, world, cases):
    """Every case of `cases` (PackedCase) on this rank (run with reliability_helpers.run_ranks: one world for
    all): per case, this rank's errors against float64 (of the gathered results: the same on every rank), its CP
    stats after the forward and after the backward, or the exception it raised."""
    import torch.distributed as dist

    meshes, results, library = {}, [], None
    for case in cases:
        start = time.monotonic()
        if case.provider in ("flash", "flash_varlen") and case.library != library:
            library = case.library
            _install_standin(library)
        if case.mesh and case.mesh not in meshes:  # made once per shape, by every rank in the same order
            from torch.distributed.device_mesh import init_device_mesh
            meshes[case.mesh] = init_device_mesh("cpu", case.mesh, mesh_dim_names=("ring", "ulysses"))
        mesh = meshes[case.mesh] if case.mesh else dist.group.WORLD
        try:
            result = _run_documents_case(case, mesh)
        except Exception as exc:  # reported, asserted on by the test
            if os.environ.get("CPATTN_TEST_TRACEBACK"):
                traceback.print_exc()
            result = {"exception": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.monotonic() - start, 3)
        results.append(result)
    return results


def packed_ranks(rank, world, payloads):
    """`packed_rank` for every payload of `payloads` in one world (run with reliability_helpers.run_ranks): per
    payload (its value, the exception type, "Type: message"), the last two None where it returned."""
    results = []
    for payload in payloads:
        try:
            results.append((packed_rank(rank, world, payload), None, None))
        except Exception as exc:  # reported, asserted on by the test
            results.append((None, type(exc).__name__, f"{type(exc).__name__}: {exc}"))
    return results
