"""Helpers of the reliability tests: run a function on W gloo ranks under a hard deadline, and the tolerances
of context-parallel results, which grow with the world size.

`run_ranks` is the escape hatch from tests/support/cp_harness.py for what its fixed cases cannot express: ranks that
call attention differently, ranks that die or hang, results other than errors against the reference. Every
spawned process is bounded: the parent kills whatever is still alive at the deadline and says so, so no test
here can hang CI.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.multiprocessing as mp

from helpers import GRAD_ATOL, OUT_ATOL


# -- tolerances ----------------------------------------------------------------------------------------------


def cp_tolerance(dtype: torch.dtype, world: int, what: str = "out") -> float:
    """Absolute tolerance of a W-rank context-parallel result (outputs and inputs O(1)) against float64.

    Ring attention rounds each of the W block outputs to the input dtype before merging them in float32, and
    dK/dV sum W block gradients (each rounded to the input dtype) in float32 accumulators; Ulysses and
    all-gather round no more than one device does. Each extra block adds at most one rounding of an O(1)
    value, so the bound grows linearly in W from the single-device tolerance of tests/support/helpers.py:

        tol(dtype, W) = base(dtype) * (1 + (W - 1) / 4)        base = OUT_ATOL (what="out") or GRAD_ATOL

    i.e. 1x at W=1, 1.25x at W=2, 2.75x at W=8. Measured at W=8 (tests/distributed/test_numerics.py), bfloat16: output
    7e-3 against a bound of 8.3e-2, dV 1.4e-2 against 0.22; float32: ~4e-7 against 5.5e-5.
    """
    base = (OUT_ATOL if what == "out" else GRAD_ATOL)[dtype]
    return base * (1 + (world - 1) / 4)


# -- running a function on W ranks -------------------------------------------------------------------------


@dataclass
class RankResult:
    rank: int
    value: object = None  # what the function returned
    error: str | None = None  # "TypeName: message" if it raised
    error_type: str | None = None
    seconds: float = 0.0  # from entering the function to returning or raising
    exitcode: int | None = None  # process exit code (None: killed at the deadline)
    killed: bool = False


@dataclass
class WorldResult:
    ranks: list[RankResult] = field(default_factory=list)
    elapsed: float = 0.0

    def __getitem__(self, rank: int) -> RankResult:
        return self.ranks[rank]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, payload, queue, barrier: bool) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A short process-group timeout bounds anything the test itself does not bound (barriers, new_group).
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30))
    start = time.monotonic()
    code = 0
    try:
        result = (fn(rank, world, payload), None, None)
    except BaseException as exc:  # reported to the parent; the exit code says it too
        if os.environ.get("CPATTN_TEST_TRACEBACK"):
            traceback.print_exc()
        result = (None, type(exc).__name__, f"{type(exc).__name__}: {exc}")
        code = 1
    queue.put((rank, result, time.monotonic() - start))
    if barrier and code == 0:
        try:  # keep the store (hosted by rank 0) and peers up until every rank is done
            dist.barrier(async_op=True).wait(timeout=datetime.timedelta(seconds=20))
        except Exception:
            pass
    os._exit(code)  # never destroy_process_group: in a broken world it can block


def run_ranks(world: int, fn, payload=None, timeout: float = 120.0, barrier: bool = True) -> WorldResult:
    """Run `fn(rank, world, payload)` on `world` spawned gloo ranks; every process is killed at `timeout`.

    `fn` must be a module-level function (spawn pickles it by name). Returns every rank's value or error,
    the seconds it took, its exit code (non-zero when it raised or died) and whether it had to be killed.
    `barrier=False` for worlds meant to break (a rank that dies or hangs): ranks exit as soon as they finish.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    start = time.monotonic()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, payload, queue, barrier), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = start + timeout
    results = {r: RankResult(r) for r in range(world)}
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        while not queue.empty():
            rank, (value, etype, error), seconds = queue.get()
            results[rank].value, results[rank].error_type, results[rank].error = value, etype, error
            results[rank].seconds = seconds
        time.sleep(0.05)
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
    while not queue.empty():
        rank, (value, etype, error), seconds = queue.get()
        results[rank].value, results[rank].error_type, results[rank].error = value, etype, error
        results[rank].seconds = seconds
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join(5)
            results[r].killed = True
        results[r].exitcode = p.exitcode if not results[r].killed else None
    return WorldResult([results[r] for r in range(world)], time.monotonic() - start)
