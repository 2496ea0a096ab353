"""Faults under context parallelism on CPU with gloo: every failure is loud, names its cause, and is bounded.

* Calls that cannot work (a layout that does not match how the inputs were sharded, a mesh that does not match
  the world, ranks that disagree on dtype, heads, flags...) raise the same clear error on every rank within
  seconds, before any data moves.
* A rank that dies, raises or hangs mid-step: the remaining ranks raise CommTimeoutError naming it within
  cp_timeout + 2 s (ranks whose own wait fails report in through the torch.distributed store for up to
  cp_timeout + min(cp_timeout, 2 s) after they started waiting; the ones that never report are named) and
  exit non-zero; under torchrun the whole job exits non-zero.

Every process here is bounded (tests/reliability_helpers.run_ranks kills what outlives its deadline; the
torchrun job runs under subprocess timeout), so none of these tests can hang CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from reliability_helpers import run_ranks

pytestmark = pytest.mark.distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CP_TIMEOUT = 3.0  # seconds; short so that the fault tests are quick
QUICK = 10.0  # an error every rank can detect locally or in the agreement check must come within this


def _qkv(seq, heads=2, kv_heads=2, dim=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, seq, dim, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(1, kv_heads, seq, dim, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(1, kv_heads, seq, dim, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def _sharded(mesh, seq, layout="zigzag", **kw):
    import cpattn

    return [cpattn.shard_sequence(t, mesh, 2, layout) for t in _qkv(seq, **kw)]


# -- scenarios: each runs on every rank of a 2-rank world and raises (or returns) --------------------------------


def _layout_mismatch(rank, mesh):
    """Sharded zigzag, run as contiguous: 7 tokens over 2 ranks give lengths [3, 4] zigzag, [4, 3] contiguous."""
    import cpattn

    q, k, v = _sharded(mesh, 7, "zigzag")
    with cpattn.attention_provider("native", cp_mesh=mesh, cp_layout="contiguous", cp_timeout=CP_TIMEOUT):
        return cpattn.attention_dispatch(q, k, v, is_causal=True)


def _layouts_differ(rank, mesh):
    import cpattn

    layout = "zigzag" if rank == 0 else "contiguous"
    q, k, v = _sharded(mesh, 8, layout)
    with cpattn.attention_provider("native", cp_mesh=mesh, cp_layout=layout, cp_timeout=CP_TIMEOUT):
        return cpattn.attention_dispatch(q, k, v, is_causal=True)


def _unsharded_inputs_with_mask(rank, mesh):
    """Every rank passes the whole sequence (forgot to shard) with its (S, S) mask: the key count is off."""
    import cpattn

    q, k, v = _qkv(8)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    with cpattn.attention_provider("native", cp_mesh=mesh, cp_timeout=CP_TIMEOUT):
        return cpattn.attention_dispatch(q, k, v, attn_mask=mask)


def _call_differs(field):
    def scenario(rank, mesh):
        import cpattn

        kw = dict(dtype=torch.bfloat16 if field == "dtype" and rank == 1 else torch.float32)
        if field == "query heads" and rank == 1:
            kw.update(heads=4)
        q, k, v = _sharded(mesh, 8, **kw)
        args = dict(is_causal=not (field == "is_causal" and rank == 1), enable_gqa=True)
        if field == "mask kind" and rank == 1:
            args["attn_mask"] = torch.ones(1, 1, 1, 8, dtype=torch.bool)
        if field == "scale":
            args["scale"] = 0.5 if rank == 0 else 0.25
        if field == "requires grad" and rank == 0:
            q.requires_grad_(True)
        with cpattn.attention_provider("native", cp_mesh=mesh, cp_strategy="ring", cp_timeout=CP_TIMEOUT):
            return cpattn.attention_dispatch(q, k, v, **args)

    return scenario


def _mesh_2d_without_names(rank, mesh):
    import cpattn
    from torch.distributed.device_mesh import init_device_mesh

    bad = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "cp"))
    with cpattn.attention_provider("native", cp_mesh=bad, cp_timeout=CP_TIMEOUT):
        pass


def _ring_on_a_2d_mesh(rank, mesh):
    import cpattn
    from torch.distributed.device_mesh import init_device_mesh

    mesh2 = init_device_mesh("cpu", (1, 2), mesh_dim_names=("ring", "ulysses"))
    with cpattn.attention_provider("native", cp_mesh=mesh2, cp_strategy="ring", cp_timeout=CP_TIMEOUT):
        pass


def _not_a_member(rank, mesh):
    """Rank 0 is handed a group it does not belong to (what dist.new_group returns outside the group)."""
    import torch.distributed as dist

    import cpattn

    group = dist.new_group([1])
    q, k, v = _qkv(4)
    with cpattn.attention_provider("native", cp_mesh=group, cp_timeout=CP_TIMEOUT):
        return cpattn.attention_dispatch(q, k, v, is_causal=True).shape


SCENARIOS = {
    "layout_mismatch": _layout_mismatch,
    "layouts_differ": _layouts_differ,
    "unsharded_inputs": _unsharded_inputs_with_mask,
    "dtype": _call_differs("dtype"),
    "query heads": _call_differs("query heads"),
    "is_causal": _call_differs("is_causal"),
    "mask kind": _call_differs("mask kind"),
    "scale": _call_differs("scale"),
    "requires grad": _call_differs("requires grad"),
    "mesh_2d_names": _mesh_2d_without_names,
    "ring_on_2d_mesh": _ring_on_a_2d_mesh,
    "not_a_member": _not_a_member,
}

# scenario -> (rank(s) that must raise, error type, text every such error contains)
EXPECTED = {
    "layout_mismatch": ((0, 1), "RankMismatchError",
                        "local sequence lengths [3, 4] do not match the 'contiguous' layout"),
    "layouts_differ": ((0, 1), "RankMismatchError", "disagree on layout: rank 0: zigzag, rank 1: contiguous"),
    "unsharded_inputs": ((0, 1), "InvalidArgumentError", "(local query rows x all keys): 16 keys"),
    "dtype": ((0, 1), "RankMismatchError", "disagree on dtype: rank 0: float32, rank 1: bfloat16"),
    "query heads": ((0, 1), "RankMismatchError", "disagree on query heads: rank 0: 2, rank 1: 4"),
    "is_causal": ((0, 1), "RankMismatchError", "disagree on is_causal: rank 0: 1, rank 1: 0"),
    "mask kind": ((0, 1), "RankMismatchError", "disagree on mask kind: rank 0: none, rank 1: bool"),
    "scale": ((0, 1), "RankMismatchError", "disagree on scale: rank 0: 0.5, rank 1: 0.25"),
    "requires grad": ((0, 1), "RankMismatchError", "disagree on requires grad: rank 0: 1, rank 1: 0"),
    "mesh_2d_names": ((0, 1), "InvalidArgumentError", "mesh_dim_names ('ring', 'ulysses')"),
    "ring_on_2d_mesh": ((0, 1), "InvalidArgumentError", "a 2-D ('ring', 'ulysses') mesh runs 'hybrid'"),
    "not_a_member": ((0,), "InvalidArgumentError", "global rank 0) is not a member of cp_mesh"),
}


def _run_scenarios(rank, world, names):
    """Every scenario in turn on one world; then a mesh that does not match the world, which breaks it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import cpattn

    mesh = init_device_mesh("cpu", (world,))
    report = {}
    for name in names:
        start = time.monotonic()
        try:
            SCENARIOS[name](rank, mesh)
            report[name] = (None, None, time.monotonic() - start)
        except Exception as exc:
            report[name] = (type(exc).__name__, str(exc), time.monotonic() - start)
    # Last: rank 1 passes a 1-rank group instead of the 2-rank mesh, so it runs alone and goes on; rank 0 waits
    # for it in the agreement check and must name it within the timeout. (This leaves the world unusable.)
    singles = [dist.new_group([r]) for r in range(world)]
    cp_mesh = mesh if rank == 0 else singles[rank]
    q, k, v = _qkv(4)
    start = time.monotonic()
    try:
        with cpattn.attention_provider("native", cp_mesh=cp_mesh, cp_timeout=CP_TIMEOUT):
            cpattn.attention_dispatch(q, k, v, is_causal=True)
        report["mesh_size"] = (None, None, time.monotonic() - start)
        if rank != 0:
            time.sleep(CP_TIMEOUT + min(CP_TIMEOUT, 2.0) + 1)  # alive, but not in rank 0's call
    except Exception as exc:
        report["mesh_size"] = (type(exc).__name__, str(exc), time.monotonic() - start)
    return report


@pytest.fixture(scope="module")
def scenario_reports():
    result = run_ranks(2, _run_scenarios, list(SCENARIOS), timeout=150, barrier=False)
    for r in result.ranks:
        assert not r.killed, f"rank {r.rank} hung and was killed"
        assert r.error is None and r.exitcode == 0, f"rank {r.rank} failed outside the scenarios: {r.error}"
    return [r.value for r in result.ranks]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_bad_cp_calls_raise_the_same_clear_error_on_every_rank_quickly(scenario_reports, name):
    ranks, kind, text = EXPECTED[name]
    for rank, report in enumerate(scenario_reports):
        etype, message, seconds = report[name]
        if rank not in ranks:
            assert etype is None, f"rank {rank} should have run, got {etype}: {message}"
            continue
        assert etype == kind, f"rank {rank}: expected {kind}, got {etype}: {message}"
        assert text in message, f"rank {rank}: {message!r} lacks {text!r}"
        assert seconds < QUICK, f"rank {rank} took {seconds:.1f}s to raise"


def test_mesh_that_does_not_match_the_world_names_the_missing_rank(scenario_reports):
    """Rank 1 gave a 1-rank group, rank 0 the 2-rank mesh: rank 1 runs alone, rank 0 names it within the bound."""
    etype, message, seconds = scenario_reports[0]["mesh_size"]
    assert etype == "CommTimeoutError", message
    assert "agreement check" in message and "no word from rank(s) 1 (global rank 1)" in message, message
    assert CP_TIMEOUT - 0.5 <= seconds <= CP_TIMEOUT + min(CP_TIMEOUT, 2.0) + 3, f"{seconds:.1f}s"
    assert scenario_reports[1]["mesh_size"][0] is None  # its own call was a valid 1-rank call


# -- a rank that dies or raises mid-step -------------------------------------------------------------------------


def _step_with_a_dying_rank(rank, world, victim):
    """Forward, then the victim dies (no exception, no cleanup: os._exit), the others go on into backward."""
    from torch.distributed.device_mesh import init_device_mesh

    import cpattn

    mesh = init_device_mesh("cpu", (world,))
    q, k, v = (t.requires_grad_() for t in _sharded(mesh, 12))
    with cpattn.attention_provider("native", cp_mesh=mesh, cp_strategy="ring", cp_timeout=CP_TIMEOUT):
        out = cpattn.attention_dispatch(q, k, v, is_causal=True)
        if rank == victim:
            os._exit(17)
        start = time.monotonic()
        try:
            out.sum().backward()
        finally:
            print(f"rank {rank}: backward ended after {time.monotonic() - start:.1f}s", flush=True)
    return "finished"


def test_a_rank_that_dies_mid_step_is_named_by_the_others_within_the_timeout():
    world, victim = 3, 2
    result = run_ranks(world, _step_with_a_dying_rank, victim, timeout=90, barrier=False)
    assert result[victim].exitcode == 17
    for r in result.ranks:
        if r.rank == victim:
            continue
        assert not r.killed, f"rank {r.rank} hung until the test's deadline"
        assert r.exitcode != 0, f"rank {r.rank} exited 0"
        assert r.error_type == "CommTimeoutError", r.error
        assert "ring exchange" in r.error
        assert f"no word from rank(s) {victim} (global rank {victim})" in r.error, r.error
        assert r.seconds <= CP_TIMEOUT + min(CP_TIMEOUT, 2.0) + 3, f"rank {r.rank} took {r.seconds:.1f}s"


TORCHRUN_JOB = textwrap.dedent(
    """
    import os, sys, time
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    sys.path.insert(0, {repo!r})
    import cpattn

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (cpattn.shard_sequence(torch.randn(1, 2, 12, 8, generator=gen), mesh, 2).requires_grad_()
               for _ in range(3))
    with cpattn.attention_provider("native", cp_mesh=mesh, cp_strategy="ring", cp_timeout={timeout}):
        out = cpattn.attention_dispatch(q, k, v, is_causal=True)
        if rank == 1 and {fault!r} == "raise":
            raise RuntimeError("injected fault on rank 1 between forward and backward")
        if rank == 1 and {fault!r} == "hang":
            print("rank 1 hangs between forward and backward", flush=True)
            time.sleep(300)
        try:
            out.sum().backward()
        except cpattn.CommTimeoutError as exc:
            print(f"SURVIVOR rank {{rank}}: {{exc}}", flush=True)
            raise
    print(f"rank {{rank}} finished", flush=True)
    """
)


@pytest.mark.parametrize("fault", ["raise", "hang"])
def test_a_faulty_rank_under_torchrun_fails_the_whole_job_quickly(tmp_path, fault):
    """`raise`: rank 1 raises between forward and backward; torchrun sees it exit, stops rank 0 and names rank 1
    as the root cause. `hang`: rank 1 sleeps there; torchrun sees nothing wrong, so rank 0 must time out by itself
    (CommTimeoutError naming rank 1) and exit non-zero, after which torchrun stops the job. Without bounded
    waits this would hang for gloo's default 30 minutes."""
    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_JOB.format(repo=REPO, timeout=CP_TIMEOUT, fault=fault))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--monitor-interval", "0.5", str(script)]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env, cwd=str(tmp_path))
    except subprocess.TimeoutExpired as exc:  # subprocess.run kills the job before raising
        pytest.fail(f"torchrun job still running after 90 s:\n{str(exc.stdout or '')[-3000:]}")
    elapsed = time.monotonic() - start
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    assert elapsed < 60, f"the job took {elapsed:.0f}s to fail"
    assert "finished" not in log, log[-3000:]
    root_cause = log[log.index("Root Cause"):] if "Root Cause" in log else ""
    if fault == "raise":
        assert "injected fault on rank 1" in log, log[-3000:]
        assert "rank      : 1 (local_rank: 1)" in root_cause, log[-3000:]
    else:
        survivor = [line for line in log.splitlines() if line.startswith("SURVIVOR rank 0")]
        assert survivor, log[-3000:]
        assert "no word from rank(s) 1 (global rank 1)" in survivor[0], survivor[0]
        assert "rank      : 0 (local_rank: 0)" in root_cause, log[-3000:]
