"""The launch/ entry points under torchrun: demo.py and train.py, single-node and two-node rendezvous on loopback.

Each run is a real `torchrun` (as `python -m torch.distributed.run`, the same program) in its own process group,
killed whole if it outlives its timeout.
"""

from __future__ import annotations

import re

import pytest
from launch_util import TORCHRUN, finish, free_port, run, start

pytestmark = pytest.mark.distributed
TIMEOUT = 240


@pytest.mark.parametrize("nproc", [2, 3])
def test_demo_under_torchrun(nproc):
    code, out = run(TORCHRUN + ["--standalone", f"--nproc-per-node={nproc}", "launch/demo.py",
                                "--seq", "64", "--steps", "1", "--schedules", "ring", "ulysses"])
    assert code == 0, out[-4000:]
    assert f"cpattn demo: {nproc} ranks, gloo on cpu" in out, out[-4000:]
    rows = re.findall(r"^(\S+)\s+(ring|ulysses)\s+\S+\s+\S+\s+\S+\s+\S+\s+(ok|FAIL)$", out, re.M)
    assert {(p, s) for p, s, _ in rows} >= {("native", "ring"), ("native", "ulysses")}, out[-4000:]
    assert all(v == "ok" for *_, v in rows), out[-4000:]
    assert "parity: all ok" in out, out[-4000:]


def test_train_under_torchrun():
    code, out = run(TORCHRUN + ["--standalone", "--nproc-per-node=2", "launch/train.py",
                                "--steps", "12", "--log-every", "4"])
    assert code == 0, out[-4000:]
    steps = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)\s+[\d.]+$", out, re.M)
    assert [int(s[0]) for s in steps] == [0, 4, 8, 11], out[-4000:]
    for _, cp, single, _ in steps:
        assert abs(float(cp) - float(single)) <= 1e-3, out[-4000:]
    assert "parity: loss curves match" in out, out[-4000:]


def test_train_detects_per_rank_mean_loss():
    """The parity check can fail: the classic per-rank-mean loss reduction diverges and exits non-zero."""
    code, out = run(TORCHRUN + ["--standalone", "--nproc-per-node=2", "launch/train.py",
                                "--steps", "3", "--loss-reduction", "rank-mean"])
    assert code != 0, out[-4000:]
    assert "parity: DIVERGED" in out, out[-4000:]


def test_two_node_rendezvous_on_loopback():
    """Two torchrun 'nodes' of 2 ranks each meet through the c10d rendezvous on 127.0.0.1 (multi-node path)."""
    port = free_port()
    procs = [
        start(TORCHRUN + ["--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d",
                          f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=cpattn-test", f"--node-rank={node}",
                          "launch/train.py", "--steps", "4", "--log-every", "2"])
        for node in (0, 1)
    ]
    results = finish(procs, TIMEOUT)
    for node, (code, out) in enumerate(results):
        assert code == 0, f"node {node} exited {code}:\n{out[-4000:]}"
    combined = "".join(out for _, out in results)
    assert "cpattn train: 4 ranks" in combined, combined[-4000:]  # one world of 2 x 2 ranks
    assert combined.count("parity: loss curves match") == 1, combined[-4000:]  # printed by global rank 0 only
