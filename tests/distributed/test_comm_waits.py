"""How comm waits: without cp_timeout, stream-ordered on NCCL (no host block) and bounded elsewhere; with it,
bounded everywhere.

A timed NCCL wait blocks the host and polls with sleeps (benchmarks/results/multigpu_h200x2: 6-8 ms per Ulysses
call), so it is opt-in there; gloo's waits are host waits by nature and always bounded. The agreement check is
given a timeout on every backend, since it is what turns disagreeing ranks into the same error everywhere.
"""

import datetime

import pytest

from cpattn.cp.comm import DEFAULT_TIMEOUT, _wait
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


def test_nccl_waits_without_cp_timeout_are_stream_ordered():
    work = _Work()
    _wait(work, None, "ring exchange", _group("nccl"))
    assert work.calls == [None]


def test_gloo_waits_without_cp_timeout_are_bounded_by_the_default():
    work = _Work()
    _wait(work, None, "ring exchange", _group("gloo"))
    assert work.calls == [datetime.timedelta(seconds=DEFAULT_TIMEOUT)]


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_waits_with_a_timeout_are_bounded(backend):
    work = _Work()
    _wait(work, 5.0, "agreement check", _group(backend))
    assert work.calls == [datetime.timedelta(seconds=5.0)]


def test_cp_timeout_given_makes_data_waits_bounded():
    from cpattn.cp.context import ContextParallel
    from cpattn.cp.mesh import Topology
    from cpattn.cp.ring import ring_spec

    topology = Topology(_group("nccl"), None, 1)
    assert ContextParallel(topology).data_timeout is None
    given = ContextParallel(topology, timeout=7.0, bounded_waits=True)
    assert given.data_timeout == 7.0 and ring_spec(given, 8).timeout == 7.0


def test_a_bounded_wait_that_fails_raises_naming_what(monkeypatch):
    import cpattn.cp.comm as comm

    monkeypatch.setattr(comm, "_absent_peers", lambda group, deadline: "no word from rank(s) 1")
    with pytest.raises(CommTimeoutError, match="all-to-all.*no word from rank"):
        _wait(_Work(finishes=False), 0.01, "all-to-all", _group("gloo"))
