"""How comm waits on each backend: stream-ordered on NCCL (no host block), bounded host waits elsewhere.

A timed NCCL wait blocks the host and polls with sleeps (benchmarks/results/multigpu_h200x2: 6-8 ms per Ulysses
call); gloo's waits are host waits by nature and must stay bounded. The agreement check is a bounded host wait
on every backend, since it is what turns disagreeing ranks into the same error everywhere.
"""

import datetime

import pytest

from cpattn.cp.comm import _wait
from cpattn.cp.mesh import Group
from cpattn.errors import CommTimeoutError


class _Work:
    def __init__(self, finishes: bool = True):
        self.calls, self.finishes = [], finishes

    def wait(self, timeout=None):
        self.calls.append(timeout)
        return self.finishes


def _group(backend: str) -> Group:
    return Group(pg=None, rank=0, size=2, backend=backend)


def test_nccl_data_waits_are_stream_ordered():
    work = _Work()
    _wait(work, 5.0, "ring exchange", _group("nccl"))
    assert work.calls == [None]


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_host_waits_are_bounded(backend):
    work = _Work()
    _wait(work, 5.0, "agreement check", _group(backend), host=backend == "nccl")
    assert work.calls == [datetime.timedelta(seconds=5.0)]


def test_a_bounded_wait_that_fails_raises_naming_what(monkeypatch):
    import cpattn.cp.comm as comm

    monkeypatch.setattr(comm, "_absent_peers", lambda group, deadline: "no word from rank(s) 1")
    with pytest.raises(CommTimeoutError, match="all-to-all.*no word from rank"):
        _wait(_Work(finishes=False), 0.01, "all-to-all", _group("gloo"))
