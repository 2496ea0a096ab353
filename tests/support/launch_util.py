"""Bounded subprocesses for tests that start real `torchrun` jobs (tests/distributed/test_launch.py and friends).

Each process gets its own process group; past the deadline the whole group (torchrun and its ranks) is killed
and the test fails with the output so far.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the `torchrun` program, on this interpreter


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CPATTN_PROVIDER"):
        e.pop(key, None)
    return e


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """Wait for every process; past the deadline kill each one's whole process group and fail the test."""
    deadline = time.monotonic() + timeout
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"{' '.join(proc.args)} ran past {timeout:.0f} s; output:\n{out[-4000:]}")
        results.append((proc.returncode, out))
    return results


def run(cmd: list[str], timeout: float = 240) -> tuple[int, str]:
    return finish([start(cmd)], timeout)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
