"""CP scaling: context parallelism across GPUs with NCCL, one rank per GPU, against one GPU.

    torchrun --standalone --nproc-per-node <GPUs> benchmarks/cp_scaling.py
    torchrun --standalone --nproc-per-node <GPUs> benchmarks/cp_scaling.py --sections speed --seqs 131072
    torchrun --standalone --nproc-per-node 2 benchmarks/cp_scaling.py --smoke    # CPU ranks over gloo, tiny shapes

Sections (--sections), each saved to cp_scaling_<W>x<device>.json (rank 0) as soon as it ends, so a run cut
short keeps what it measured:
  bandwidth  NCCL send/recv one way, both ways at once (what a ring step does) and all_to_all_single.
  check      every provider whose library runs here x ring / Ulysses / all-gather, forward and backward, against
             the same provider on one GPU and against the float64 reference of the whole problem.
  speed      scaling efficiency = one-GPU time / (W x per-rank time) for the fastest providers (FA4 and cuDNN).
  peers      PyTorch's own context_parallel (SDPA on cuDNN) and diffusers' ring / Ulysses attention
             (its `_native_cudnn` backend) on the same shapes, against cpattn with the same kernel.
  profile    where one sharded call's time goes on each rank (torch profiler): attention kernels, other
             compute kernels, NCCL kernels, and the time the compute stream sat idle (waiting on a transfer or
             on the host), next to the same call's kernels on one GPU. Off by default; name it in --sections.
At the end rank 0 writes a markdown summary (benchmarks/cp_report.py, which also merges several runs) and a PNG
of the efficiencies beside the JSON.

Timing: every rank runs the same number of iterations (do_bench chooses a count per process, and ranks that
disagree on it would wait on each other's collectives forever); each iteration starts after a barrier and ends
with a device synchronisation, its time is the slowest rank's, and the median over iterations is reported.
Memory is the peak allocated during the timed iterations above what was allocated before them (the inputs),
i.e. the working memory of the attention call itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
from unittest import mock

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cpattn  # noqa: E402
from benchmarks import common, cp_report  # noqa: E402
from cpattn.reference import reference_attention  # noqa: E402
from launch.spawn import exit_rank  # noqa: E402

GIB = 2.0**30
SECTIONS = ("bandwidth", "check", "speed", "peers", "profile")
# Providers that differ in their context-parallel path; the check runs those whose library loads here.
# flex last: it compiles a kernel per block shape, the slowest to check.
CHECK_PROVIDERS = ("flash", "_native_cudnn", "native", "_native_flash", "_native_efficient", "_native_math", "sage",
                   "xformers", "flex")
SPEED_PROVIDERS = ("flash", "_native_cudnn")  # FA4 and cuDNN: the fastest kernels on Hopper
ATOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 1e-4}


# -- ranks, timing, saving ------------------------------------------------------------------------------


class Run:
    """This process's place in the job and where results go."""

    def __init__(self, args):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cuda = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.smoke = args.smoke
        self.args = args
        name = common.device_name(self.device)
        self.result = {"suite": "cp_scaling", "device": f"{self.world} x {name}", "backend": dist.get_backend(),
                       "world": self.world, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                       "versions": _versions()}
        self.path = common.results_path("cp_scaling", self.result["device"], args.out, args.tag)
        self.budget = dict(b.split("=") for b in args.budget)
        self.section, self.section_started = None, time.time()

    def start_section(self, section: str) -> None:
        self.section, self.section_started = section, time.time()

    def out_of_time(self) -> bool:
        """True on every rank once the slowest has spent the section's --budget: its later measurements are
        recorded as skipped, so an outer time limit never cuts one off mid-way and the next sections still run."""
        limit = float(self.budget.get(self.section, "inf"))
        return self.agree(time.time() - self.section_started) > limit

    def save(self, section: str, value) -> None:
        if self.rank != 0:
            return
        self.result[section] = value
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.result, f, indent=1, default=str)

    def log(self, *parts) -> None:
        if self.rank == 0:
            print(*parts, flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def slowest(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def agree(self, value: float) -> float:
        return self.slowest([value])[0]

    def time_call(self, fn, budget_s: float = 0.4, max_iters: int = 25) -> dict:
        """Median over iterations of the slowest rank's time for `fn` (see module docstring)."""
        for _ in range(3):  # warm-up: JIT compiles, caches, allocator, NCCL channels; after one call the first
            fn()  # configuration of a process still times slow
        estimate = self.agree(self._one(fn))
        iters = 2 if self.smoke else int(min(max_iters, max(3, budget_s / max(estimate, 1e-6))))
        before = torch.cuda.memory_allocated() if self.cuda else 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        times = self.slowest([self._one(fn) for _ in range(iters)])
        peak = torch.cuda.max_memory_allocated() - before if self.cuda else 0
        q = statistics.quantiles(times, n=5) if len(times) >= 2 else times * 4
        return {"median_ms": 1e3 * statistics.median(times), "p20_ms": 1e3 * q[0], "p80_ms": 1e3 * q[-1],
                "iters": iters, "peak_extra_gib": self.agree(peak) / GIB}

    def _one(self, fn) -> float:
        self.sync()
        dist.barrier()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def _versions() -> dict:
    found = {}
    for module in ("flash_attn", "sageattention", "xformers", "diffusers", "triton"):
        try:
            found[module] = getattr(__import__(module), "__version__", "present")
        except Exception as exc:  # absent or broken: say which
            found[module] = f"not importable ({type(exc).__name__})"
    return found


def _guard(run: Run, label: str, fn):
    """Run one measurement; an exception on any rank is recorded, not fatal to the rest of the section."""
    try:
        value, error = fn(), None
    except Exception as exc:
        value, error = None, f"{type(exc).__name__}: {exc}"[:1500]
        if os.environ.get("CPATTN_BENCH_TRACEBACK"):
            traceback.print_exc()
    failed = run.agree(float(error is not None))
    if failed and error is None:
        error = "another rank failed"
    if error:
        run.log(f"  {label}: {error[:300]}")
        _drain(run)
    return value, error


def _drain(run: Run) -> None:
    """After a failure, let every rank reach the same point before the next measurement."""
    run.sync()
    dist.barrier()


# -- 1. bandwidth ------------------------------------------------------------------------------------------


def bandwidth(run: Run) -> list[dict]:
    """NCCL point-to-point and all-to-all throughput between the GPUs (a torch.distributed loop)."""
    rows = []
    sizes = [2**20] if run.smoke else [2**p for p in (20, 24, 26, 28, 30)]
    nxt, prv = (run.rank + 1) % run.world, (run.rank - 1) % run.world
    for nbytes in sizes:
        send = torch.randn(nbytes // 2, device=run.device).to(torch.bfloat16)
        recv = torch.empty_like(send)

        def one_way():  # rank 0 sends to rank 1, the others idle
            if run.rank == 0:
                dist.send(send, 1)
            elif run.rank == 1:
                dist.recv(recv, 0)

        def ring_step():  # every rank sends to the next and receives from the previous, as a ring step does
            ops = [dist.P2POp(dist.isend, send, nxt), dist.P2POp(dist.irecv, recv, prv)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

        out = torch.empty_like(send)

        def all_to_all():
            dist.all_to_all_single(out, send)

        for name, fn, moved in (("send_recv_one_way", one_way, nbytes), ("ring_step_both_ways", ring_step, nbytes),
                                ("all_to_all", all_to_all, nbytes * (run.world - 1) / run.world)):
            t = run.time_call(fn, budget_s=0.2)
            row = {"op": name, "bytes": nbytes, "median_ms": t["median_ms"],
                   "GB_per_s": moved / (t["median_ms"] * 1e-3) / 1e9}
            rows.append(row)
            run.log(f"  {name:<22}{nbytes / 2**20:>8.0f} MiB {row['GB_per_s']:>8.1f} GB/s per rank")
    return rows


# -- 2. correctness ------------------------------------------------------------------------------------------


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def _check_case(run: Run, provider: str, schedule: str, causal: bool, grad: bool, shape, dtype, mesh) -> dict:
    b, hq, hkv, s, d = shape
    gen = torch.Generator().manual_seed(1234 + s + hq)  # the same whole problem on every rank
    q, k, v = (torch.randn(b, h, s, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    dout = torch.randn(b, hq, s, d, generator=gen, dtype=torch.float64)
    gqa = hq != hkv
    dev = lambda t: t.to(run.device, dtype).requires_grad_(grad)  # noqa: E731

    # the same provider on this one GPU, the whole problem
    q1, k1, v1 = (dev(t) for t in (q, k, v))
    with cpattn.attention_provider(provider):
        one = cpattn.attention_dispatch(q1, k1, v1, is_causal=causal, enable_gqa=gqa)
        if grad:
            one.backward(dout.to(run.device, dtype))

    layout = "zigzag" if causal else "contiguous"
    shard = lambda t: cpattn.shard_sequence(t, mesh, 2, layout)  # noqa: E731
    gather = lambda t: cpattn.gather_sequence(t, mesh, 2, layout)  # noqa: E731
    ql, kl, vl = (dev(shard(t)) for t in (q, k, v))
    strategy, chunks = ("ulysses", CHUNKED) if schedule == "ulysses_chunked" else (schedule, None)
    with _head_chunks(chunks), cpattn.attention_provider(provider, cp_mesh=mesh, cp_strategy=strategy,
                                                          cp_layout=layout, cp_timeout=120) as state:
        out = cpattn.attention_dispatch(ql, kl, vl, is_causal=causal, enable_gqa=gqa)
        if grad:
            out.backward(shard(dout).to(run.device, dtype))
    ref = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    ref_out, _ = reference_attention(*ref, None, causal)
    if grad:
        ref_out.backward(dout)
    full = gather(out)
    row = {"out_vs_one_gpu": _max_err(full, one), "out_vs_float64": _max_err(full, ref_out),
           "one_gpu_out_vs_float64": _max_err(one, ref_out), "stats": dict(state.cp.stats)}
    if grad:
        for name, local, single, r in zip(("dq", "dk", "dv"), (ql, kl, vl), (q1, k1, v1), ref):
            g = gather(local.grad)
            row[f"{name}_vs_one_gpu"] = _max_err(g, single.grad)
            row[f"{name}_vs_float64"] = _max_err(g, r.grad)
            row[f"one_gpu_{name}_vs_float64"] = _max_err(single.grad, r.grad)
    tol = ATOL[dtype]
    # CP must be as close to float64 as the one-GPU run is (plus the dtype's tolerance for the merge's rounding)
    row["ok"] = all(row[key] <= row["one_gpu_" + key] + tol
                    for key in list(row) if key.endswith("_vs_float64") and not key.startswith("one_gpu"))
    return row


CHUNKED = 4  # "ulysses_chunked": Ulysses in this many head chunks, which cpattn picks only for large transfers


def _head_chunks(chunks: int | None):
    """Make cpattn's Ulysses use `chunks` head chunks whatever the size (None: its own choice), so the check's
    small shapes run the pipelined path that the 128k speed cases take."""
    import cpattn.cp.context as context

    if not chunks:
        return contextlib.nullcontext()
    return mock.patch.object(context, "head_chunks_for", lambda *_: chunks)


def check(run: Run, mesh) -> list[dict]:
    rows = []
    shapes = [(1, 8, 4, 64 * run.world, 64), (1, 4, 4, 4, 16)] if run.smoke else [
        (2, 8, 2, 512 * run.world + 3, 128),  # GQA, a length that does not divide evenly
        (1, 64, 64, 64, 64),  # heads == sequence length: a layout mix-up cannot pass a shape check
    ]
    providers = run.args.check_providers or CHECK_PROVIDERS
    for provider in providers:
        adapter = cpattn.PROVIDERS[provider]
        caps = adapter.capabilities(run.device.type) if adapter.availability().ok else None
        if caps is None:
            rows.append({"provider": provider, "skipped": adapter.availability().reason or "no capabilities"})
            run.log(f"  {provider:<20}skipped: {rows[-1]['skipped']}")
            continue
        dtype = torch.float32 if not run.cuda else (torch.bfloat16 if torch.bfloat16 in caps.dtypes else torch.float16)
        schedules = ["ulysses", "allgather"] + (["ring"] if caps.returns_lse else [])
        if provider in SPEED_PROVIDERS or run.smoke:
            schedules.append("ulysses_chunked")
        for schedule in schedules:
            for causal in (True, False):
                # chunked: every rank's query and KV heads cut in CHUNKED (GQA 16:8), and an uneven length
                for shape in shapes if schedule != "ulysses_chunked" else [(1, 4 * CHUNKED * run.world,
                                                                             2 * CHUNKED * run.world,
                                                                             shapes[0][3], shapes[0][4])]:
                    b, hq, hkv, s, d = shape
                    if not caps.gqa and hq != hkv or (caps.max_head_dim and d > caps.max_head_dim):
                        continue
                    grad = caps.training and (schedule != "ring" or caps.backward)
                    label = f"{provider} {schedule} causal={causal} B{b} Hq{hq} Hkv{hkv} S{s} D{d} bwd={grad}"
                    if run.out_of_time():
                        rows.append({"provider": provider, "schedule": schedule, "causal": causal,
                                     "shape": dict(zip(("B", "Hq", "Hkv", "S", "D"), shape)),
                                     "skipped": "time budget spent"})
                        continue
                    row, error = _guard(run, label, lambda: _check_case(
                        run, provider, schedule, causal, grad, shape, dtype, mesh))
                    entry = {"provider": provider, "schedule": schedule, "causal": causal, "backward": grad,
                             "shape": dict(zip(("B", "Hq", "Hkv", "S", "D"), shape)), "dtype": str(dtype)[6:]}
                    entry.update(row or {"ok": False, "error": error})
                    rows.append(entry)
                    run.save("check", rows)
                    if row:
                        worst = max(v for key, v in row.items() if key.endswith("_vs_one_gpu"))
                        run.log(f"  {label:<70}{'ok' if row['ok'] else 'FAIL'}  max diff vs one GPU {worst:.2e}")
    return rows


# -- 3. speed -------------------------------------------------------------------------------------------------


def _inputs(run: Run, b, h, s, d, grad, layout=None, mesh=None):
    """Fresh random inputs (never zeros) on this rank: the whole sequence, or this rank's shard of it."""
    torch.manual_seed(7)  # the same whole problem on every rank, so shards fit together
    dtype = torch.bfloat16 if run.cuda else torch.float32
    full = [torch.randn(b, h, s, d, device=run.device, dtype=dtype) for _ in range(4)]
    if layout is not None:
        full = [cpattn.shard_sequence(t, mesh, 2, layout) for t in full]
    q, k, v, dout = (t.contiguous() for t in full)
    return [t.requires_grad_(grad) for t in (q, k, v)], dout


def _attention_step(q, k, v, dout, backward, call):
    def step():
        for t in (q, k, v):
            t.grad = None
        out = call(q, k, v)
        if backward:
            out.backward(dout)
    return step


def speed_shapes(run: Run):
    if run.smoke:
        return [(1, 2, 64 * run.world, 32)]
    return [(1, h, s, 128) for s in run.args.seqs for h in (16, 32)]


def speed(run: Run, mesh) -> list[dict]:
    rows = []
    providers = run.args.speed_providers or (("native",) if run.smoke else SPEED_PROVIDERS)
    for provider in providers:
        if not cpattn.PROVIDERS[provider].availability().ok:
            rows.append({"provider": provider, "skipped": cpattn.PROVIDERS[provider].availability().reason})
            continue
        for (b, h, s, d) in speed_shapes(run):
            for causal in (True, False):
                for backward in (False, True):
                    if run.out_of_time():
                        rows.append({"provider": provider, "S": s, "H": h, "skipped": "time budget spent"})
                        continue
                    rows.extend(_speed_config(run, mesh, provider, b, h, s, d, causal, backward))
                    run.save("speed", rows)
    return rows


def _speed_config(run, mesh, provider, b, h, s, d, causal, backward) -> list[dict]:
    base = {"provider": provider, "B": b, "H": h, "S": s, "D": d, "causal": causal, "backward": backward}
    call = lambda q, k, v: cpattn.attention_dispatch(q, k, v, is_causal=causal)  # noqa: E731

    def one_gpu():
        (q, k, v), dout = _inputs(run, b, h, s, d, backward)
        with cpattn.attention_provider(provider):
            return run.time_call(_attention_step(q, k, v, dout, backward, call))

    single, error = _guard(run, f"{provider} one GPU S={s}", one_gpu)
    rows = []
    layout = "zigzag" if causal else "contiguous"
    for schedule in ("ring", "ulysses"):
        def sharded():
            (q, k, v), dout = _inputs(run, b, h, s, d, backward, layout, mesh)
            with cpattn.attention_provider(provider, cp_mesh=mesh, cp_strategy=schedule, cp_layout=layout):
                return run.time_call(_attention_step(q, k, v, dout, backward, call))

        per_rank, cp_error = _guard(run, f"{provider} {schedule} S={s}", sharded)
        row = dict(base, schedule=schedule, layout=layout, one_gpu=single, per_rank=per_rank)
        if single and per_rank:
            row["efficiency"] = single["median_ms"] / (run.world * per_rank["median_ms"])
        if error or cp_error:
            row["error"] = cp_error or error
        rows.append(row)
        eff = f"{row['efficiency']:.3f}" if "efficiency" in row else "error (above)"
        run.log(f"  {provider:<14}{schedule:<8}S={s:<7}H={h:<3}causal={causal!s:<6}bwd={backward!s:<6}"
                f"efficiency {eff}")
    return rows


# -- 4. peers ---------------------------------------------------------------------------------------------------


def _torch_cp_module():
    try:
        from torch.distributed.tensor.experimental import _attention
    except ImportError:
        from torch.distributed.tensor.experimental._context_parallel import _attention
    return _attention


def _torch_cp_step(run, b, h, s, d, causal, backward, rotate):
    """PyTorch's context_parallel: shards the buffers in place (head-tail load balancing) and runs SDPA's ring."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attention = _torch_cp_module()
    attention.set_rotate_method(rotate)
    # Its head-tail load balancing refuses full attention ("Load balancing requires is_causal=True").
    attention._cp_options.enable_load_balance = causal
    mesh = init_device_mesh(run.device.type, (run.world,))
    (q, k, v), dout = _inputs(run, b, h, s, d, False)
    backend = SDPBackend.CUDNN_ATTENTION if run.cuda else SDPBackend.MATH
    with context_parallel(mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2, 2, 2, 2],
                          no_restore_buffers={q, k, v, dout}):
        ql, kl, vl = (t.detach().clone().requires_grad_(backward) for t in (q, k, v))
        dl = dout.clone()
        del q, k, v, dout  # their storage keeps the whole length; the clones hold the shards

        def call(q, k, v):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run.time_call(_attention_step(ql, kl, vl, dl, backward, call))


def _diffusers_step(run, b, h, s, d, backward, schedule):
    """diffusers' dispatch_attention_fn with a ContextParallelConfig: ring (all-gathered KV, merged per block) or
    Ulysses. Its ring passes is_causal to every block, which is only right without a causal mask, so it is
    measured on full attention alone. Layout (B, S, H, D), contiguous shards."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn
    from torch.distributed.device_mesh import init_device_mesh

    degrees = dict(ring_degree=run.world) if schedule == "ring" else dict(ulysses_degree=run.world)
    shape = (run.world, 1) if schedule == "ring" else (1, run.world)
    mesh = init_device_mesh(run.device.type, shape, mesh_dim_names=("ring", "ulysses"))
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(**degrees))
    config.setup(run.rank, run.world, run.device, mesh=mesh)
    backend = AttentionBackendName._NATIVE_CUDNN if run.cuda else AttentionBackendName.NATIVE
    (q, k, v), dout = _inputs(run, b, h, s, d, False)
    part = s // run.world
    local = lambda t: t[:, :, run.rank * part:(run.rank + 1) * part].transpose(1, 2).contiguous()  # noqa: E731
    ql, kl, vl = (local(t).requires_grad_(backward) for t in (q, k, v))
    dl = local(dout)
    del q, k, v, dout

    def call(q, k, v):
        return dispatch_attention_fn(q, k, v, is_causal=False, backend=backend, parallel_config=config)
    return run.time_call(_attention_step(ql, kl, vl, dl, backward, call))


def _peer_accuracy(run, mesh, b, h, s, d, causal) -> dict:
    """Max difference of each peer's gathered output from cuDNN on one GPU (a speed of a wrong answer is moot)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    context_parallel_unshard = _torch_cp_module().context_parallel_unshard
    _torch_cp_module()._cp_options.enable_load_balance = causal

    backend = SDPBackend.CUDNN_ATTENTION if run.cuda else SDPBackend.MATH
    (q, k, v), _ = _inputs(run, b, h, s, d, False)
    with sdpa_kernel(backend):
        one = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    found = {}
    cp_mesh = init_device_mesh(run.device.type, (run.world,))
    with context_parallel(cp_mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2], no_restore_buffers={q, k, v}):
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        (full,) = context_parallel_unshard(cp_mesh, [out], [2])
    found["torch_context_parallel"] = _max_err(full, one)
    layout = "zigzag" if causal else "contiguous"
    (q, k, v), _ = _inputs(run, b, h, s, d, False, layout, mesh)
    with cpattn.attention_provider("_native_cudnn" if run.cuda else "native", cp_mesh=mesh, cp_strategy="ring",
                                   cp_layout=layout):
        out = cpattn.attention_dispatch(q, k, v, is_causal=causal)
    found["cpattn_ring"] = _max_err(cpattn.gather_sequence(out, mesh, 2, layout), one)
    return found


def peers(run: Run, mesh) -> dict:
    result = {"accuracy": {}, "rows": []}
    b, h, s, d = speed_shapes(run)[0]
    for causal in (True, False):
        acc, error = _guard(run, f"peer accuracy causal={causal}", lambda: _peer_accuracy(run, mesh, b, h, s, d,
                                                                                           causal))
        result["accuracy"][f"causal={causal}"] = acc or {"error": error}
        run.log(f"  peer accuracy causal={causal}: {acc or error}")
    for (b, h, s, d) in speed_shapes(run):
        for causal in (True, False):
            for backward in (False, True):
                runs = [(f"torch_context_parallel_{rotate}", lambda r=rotate: _torch_cp_step(
                    run, b, h, s, d, causal, backward, r)) for rotate in ("allgather", "alltoall")]
                if not causal:
                    runs += [(f"diffusers_{sched}", lambda sc=sched: _diffusers_step(run, b, h, s, d, backward, sc))
                             for sched in ("ring", "ulysses")]
                for name, fn in runs:
                    if run.out_of_time():
                        result["rows"].append({"peer": name, "S": s, "H": h, "skipped": "time budget spent"})
                        continue
                    timing, error = _guard(run, f"{name} S={s}", fn)
                    row = {"peer": name, "B": b, "H": h, "S": s, "D": d, "causal": causal, "backward": backward,
                           "per_rank": timing}
                    if error:
                        row["error"] = error
                    result["rows"].append(row)
                    if timing:
                        run.log(f"  {name:<34}S={s:<7}H={h:<3}causal={causal!s:<6}bwd={backward!s:<6}"
                                f"{timing['median_ms']:.2f} ms, {timing['peak_extra_gib']:.2f} GiB")
                run.save("peers", result)
    return result


# -- 5. profile ------------------------------------------------------------------------------------------------

# (provider, schedule, S, H, causal, backward): the cases furthest from their scaling targets
PROFILE_CASES = (("flash", "ring", 32768, 16, True, True), ("_native_cudnn", "ring", 32768, 16, True, True),
                 ("flash", "ulysses", 131072, 16, False, False), ("flash", "ring", 131072, 16, True, True))


def _kernel_breakdown(step, cuda: bool, top: int = 12) -> dict:
    """One call of `step` under the profiler: wall time, kernel time by kind, compute-stream idle time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    nccl = lambda name: "nccl" in name.lower()  # noqa: E731
    compute = [e for e in kernels if not nccl(e.key)]
    row = {"wall_ms": wall * 1e3,
           "compute_kernel_ms": sum(e.self_device_time_total for e in compute) / 1e3,
           "nccl_kernel_ms": sum(e.self_device_time_total for e in kernels if nccl(e.key)) / 1e3,
           "compute_launches": sum(e.count for e in compute),
           "top_kernels": [{"name": e.key[:90], "count": e.count, "ms": e.self_device_time_total / 1e3}
                           for e in sorted(compute, key=lambda e: -e.self_device_time_total)[:top]]}
    # NCCL kernels run on their own streams for the whole transfer; idle is measured on the other kernels
    row.update(common.gpu_idle(prof, top, exclude=nccl))
    return row


def profile_cases(run: Run, mesh) -> list[dict]:
    rows = []
    cases = PROFILE_CASES if not run.smoke else (("native", "ring", 64 * run.world, 2, True, True),)
    for provider, schedule, s, h, causal, backward in cases:
        if not cpattn.PROVIDERS[provider].availability().ok or run.out_of_time():
            continue
        b, d = 1, (32 if run.smoke else 128)
        call = lambda q, k, v: cpattn.attention_dispatch(q, k, v, is_causal=causal)  # noqa: E731
        layout = "zigzag" if causal else "contiguous"

        def measure():
            (q, k, v), dout = _inputs(run, b, h, s, d, backward)
            with cpattn.attention_provider(provider):
                step = _attention_step(q, k, v, dout, backward, call)
                for _ in range(3):
                    step()
                whole = _kernel_breakdown(step, run.cuda)
            del q, k, v, dout
            (q, k, v), dout = _inputs(run, b, h, s, d, backward, layout, mesh)
            with cpattn.attention_provider(provider, cp_mesh=mesh, cp_strategy=schedule, cp_layout=layout):
                step = _attention_step(q, k, v, dout, backward, call)
                for _ in range(3):
                    step()
                run.sync()
                dist.barrier()
                mine = _kernel_breakdown(step, run.cuda)
            ranks = [None] * run.world
            dist.all_gather_object(ranks, mine)
            return {"one_gpu": whole, "ranks": ranks}

        label = f"{provider} {schedule} S={s} H={h} causal={causal} bwd={backward}"
        value, error = _guard(run, label, measure)
        row = {"provider": provider, "schedule": schedule, "S": s, "H": h, "causal": causal, "backward": backward}
        row.update(value or {"error": error})
        rows.append(row)
        run.save("profile", rows)
        if value:
            r0, one = value["ranks"][0], value["one_gpu"]
            run.log(f"  {label}: rank 0 wall {r0['wall_ms']:.2f} ms, compute kernels {r0['compute_kernel_ms']:.2f}, "
                    f"idle {r0.get('gpu_idle_ms', 0):.2f}; one GPU kernels {one['compute_kernel_ms']:.2f} ms")
    return rows


# -- main ---------------------------------------------------------------------------------------------------------


SECTION_FUNCTIONS = {"check": check, "speed": speed, "peers": peers, "profile": profile_cases}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS[:-1]), choices=SECTIONS)
    parser.add_argument("--check-providers", nargs="*")
    parser.add_argument("--speed-providers", nargs="*")
    parser.add_argument("--seqs", type=int, nargs="*", default=[32768, 131072], help="total lengths (speed, peers)")
    parser.add_argument("--budget", nargs="*", default=[], metavar="SECTION=SECONDS",
                        help="start no new measurement of a section after this many seconds (agreed by all ranks)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU ranks with gloo")
    common.add_output_arguments(parser)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        torch.set_num_threads(1)
    run = Run(args)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(run.device.type, (run.world,))
    run.log(f"cp scaling: {run.result['device']}, {run.result['backend']}, torch {torch.__version__}, "
            f"{run.result['versions']}")
    started = time.time()
    for section in common.progress(args.sections, "cp scaling", run.rank == 0 and not args.quiet):
        run.log(f"== {section}")
        t0 = time.time()
        run.start_section(section)
        value = bandwidth(run) if section == "bandwidth" else SECTION_FUNCTIONS[section](run, mesh)
        run.save(section, value)
        run.save(f"{section}_seconds", round(time.time() - t0, 1))
    run.save("seconds", round(time.time() - started, 1))
    if run.rank == 0:
        summary = cp_report.write(os.path.splitext(run.path)[0] + ".md", [run.path])
        png = None if args.no_plot else cp_report.plot(run.result, run.path)
        run.log(f"wrote {run.path}, {summary}" + (f" and {png}" if png else ""))
    dist.barrier()
    dist.destroy_process_group()
    exit_rank(0)  # see its docstring: a gloo group can outlive destroy_process_group once flex imported dynamo


if __name__ == "__main__":
    main()
