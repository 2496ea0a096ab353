"""The ring backward's steps on streams taken in turn (cpattn/cp/streams.py), checked on CPU with stand-ins that
model stream ordering: a stand-in for StepStreams that keeps, per stream, the kernels its later work is ordered
after; a stand-in provider (the math kernel) that records what each step's kernel reads and is ordered after; and
a stand-in channel that copies KV blocks into the ring's receive buffers as a transfer would, ordered after the
stream current when it was issued. At W = 5 and 6 (where receive buffers are refilled), with 2 and 3 streams:
every refill of a buffer comes after every kernel that read it, every dK/dV send after the kernel that made it,
no step's kernel waits for the previous step's, and dQ equals the float64 reference. And which rings take a
second stream at all."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

import cpattn
from cpattn.cp import ring, streams
from cpattn.cp.mesh import Group
from cpattn.cp.ring import ring_backward, ring_forward_keeping_last
from cpattn.call import make_call
from cpattn.providers.native import NativeMath
from helpers import loopback_spec, reference_with_grads, ring_shards
from loopback_ring import LoopbackRing


class StandInStreams:
    """Stand-in for StepStreams: no CUDA, only the ordering. `after[s]`: the labels of work that anything
    enqueued on stream s from now on is ordered after (its own earlier kernels and what it waited for)."""

    def __init__(self, count: int):
        self.count = count
        self.after = {"home": set()} | {i: set() for i in range(count)}
        self.current = "home"

    @contextlib.contextmanager
    def on(self, step: int):
        stream = step % self.count
        self.after[stream] |= self.after["home"]
        self.current, before = stream, self.current
        try:
            yield
        finally:
            self.current = before

    def main_waits_for(self, step: int) -> None:
        self.after["home"] |= self.after[step % self.count]

    def join(self) -> None:
        for i in range(self.count):
            self.after["home"] |= self.after[i]

    def enqueue(self, label) -> frozenset:
        """Record work `label` on the current stream; what it is ordered after."""
        deps = frozenset(self.after[self.current])
        self.after[self.current].add(label)
        return deps

    def wait_for(self, label, deps) -> None:
        """The current stream waits for work `label` (itself ordered after `deps`)."""
        self.after[self.current] |= deps | {label}


def storage(x: torch.Tensor) -> int:
    return x.untyped_storage().data_ptr()


class RecordingMath(NativeMath):
    """Stand-in provider: the math kernel, recording each backward call as a kernel on the current stream."""

    def __init__(self, streams: StandInStreams):
        super().__init__()
        self.streams, self.kernels = streams, []  # (label, reads storage, ordered after)

    def backward(self, call, dout, out, lse):
        label = ("kernel", len(self.kernels))
        self.kernels.append((label, storage(call.key), self.streams.enqueue(label)))
        return super().backward(call, dout, out, lse)


class _Pending:
    def __init__(self, streams, label, deps, got):
        self._streams, self._label, self._deps, self._got = streams, label, deps, got

    def wait(self):
        self._streams.wait_for(self._label, self._deps)
        return self._got


class CopyingLoopback:
    """Stand-in channel for one rank: a KV exchange copies the block the peer holds into the receive buffers
    (recording a transfer ordered after the issuing stream); a dK/dV exchange records its sends and leaves the
    receive buffers as they are (no other rank computes parts here)."""

    def __init__(self, blocks, rank: int, streams: StandInStreams, provider: RecordingMath):
        self.blocks, self.rank, self.streams, self.provider = blocks, rank, streams, provider
        self.holds = {storage(k): i for i, (k, _) in enumerate(blocks)}  # storage -> the block it holds now
        self.refills, self.sends = [], []  # (storage, kernels launched before, ordered after); (ordered after,)

    def __call__(self, group, timeout, stats):
        return self

    def send_recv(self, send, to, recv, frm, kind):
        label = (kind, len(self.refills) + len(self.sends))
        deps = self.streams.enqueue(label)
        if kind != "kv":
            self.sends.append((len(self.provider.kernels), deps))
            return _Pending(self.streams, label, deps, recv)
        world = len(self.blocks)
        held = self.holds[storage(send[0])]
        index = (held + (1 if frm == (self.rank + 1) % world else -1)) % world
        for dst, src in zip(recv, self.blocks[index]):
            dst.copy_(src)
        self.holds[storage(recv[0])] = index
        self.refills.append((storage(recv[0]), list(self.provider.kernels), deps))
        return _Pending(self.streams, label, deps, recv)

    def exchange(self, send, recv, kind):
        world = len(self.blocks)
        return self.send_recv(send, (self.rank + 1) % world, recv, (self.rank - 1) % world, kind)


@pytest.mark.parametrize("world", (5, 6))
@pytest.mark.parametrize("count", (2, 3))
@pytest.mark.parametrize("layout,causal", (("zigzag", True), ("contiguous", False)))
def test_steps_on_streams_keep_buffers_and_sends_ordered(world, count, layout, causal, monkeypatch):
    total = 4 * world
    g = torch.Generator().manual_seed(world + count)
    q, k, v, dout = (torch.randn(1, 2, total, 8, generator=g, dtype=torch.float64) for _ in range(4))
    _, _, (want_dq, _, _) = reference_with_grads(q, k, v, dout, causal=causal)
    pos, blocks = ring_shards(k, v, world, layout)
    for r in range(world):
        streams = StandInStreams(count)
        monkeypatch.setattr(ring, "StepStreams", lambda device, n: streams)
        provider = RecordingMath(streams)
        channel = CopyingLoopback(blocks, r, streams, provider)
        spec = loopback_spec(r, world, layout, total, channel)
        call = make_call(q[:, :, pos[r]].contiguous(), *blocks[r], None, 0.0, causal, None, False)
        out, lse, _ = ring_forward_keeping_last(NativeMath(), call, spec, torch.float64)
        channel.refills.clear()
        dq, _, _ = ring_backward(provider, call, spec, dout[:, :, pos[r]], out, lse, torch.float64, None)
        torch.testing.assert_close(dq, want_dq[:, :, pos[r]], rtol=0, atol=1e-6)
        assert len({ptr for ptr, _, _ in channel.refills}) == count + 1  # the buffers were reused
        for ptr, launched, deps in channel.refills:
            readers = [label for label, reads, _ in launched if reads == ptr]
            assert set(readers) <= deps, f"rank {r}: a receive refills a buffer that a kernel may still read"
        kernels = provider.kernels
        for launched, deps in channel.sends:
            assert kernels[launched - 1][0] in deps, f"rank {r}: a dK/dV part is sent before its kernel ran"
        for (before, _, _), (label, _, deps) in itertools.pairwise(kernels):
            assert before not in deps, f"rank {r}: {label} waits for the step before it"
        assert {label for label, _, _ in kernels} <= streams.after["home"]  # joined before the sums are read


def test_second_stream_only_where_a_step_has_enough_work(monkeypatch):
    """Host-bound rings (small shards) stay on one stream: at 4096 rows per rank x 16 heads two streams lost
    10-17% on an H100, at 8192 they gained (cpattn/cp/streams.py). The ring asks with its shard's work."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert streams.stream_count(cuda, 2, streams.MIN_STEP_WORK) == 2
    assert streams.stream_count(cuda, 2, streams.MIN_STEP_WORK - 1) == 1
    assert streams.stream_count(cuda, 2, 4096 * 4096 * 16) == 1
    assert streams.stream_count(cuda, 2, 8192 * 8192 * 16) == 2
    assert streams.stream_count(cpu, 2, 10 ** 12) == 1
    asked = []
    monkeypatch.setattr(ring, "stream_count", lambda device, n, work: asked.append((n, work)) or 1)
    world, total = 3, 18
    q, k, v, dout = (torch.randn(2, 4, total, 8, dtype=torch.float64) for _ in range(4))
    (pos, *_), blocks = ring_shards(k, v, world, "zigzag")
    spec = loopback_spec(0, world, "zigzag", total, LoopbackRing(blocks, 0))
    call = make_call(q[:, :, pos].contiguous(), *blocks[0], None, 0.0, True, None, False)
    out, lse, last = ring_forward_keeping_last(NativeMath(), call, spec, torch.float64)
    ring_backward(NativeMath(), call, spec, dout[:, :, pos], out, lse, torch.float64, last)
    assert asked == [(2, 2 * 4 * 6 * 6)]  # batch x heads x the shard's rows x its keys


def test_cp_ring_streams_option_reaches_the_ring(monkeypatch):
    """attention_provider(..., cp_ring_streams=1) keeps the ring backward on one stream; only 1 and 2 are taken."""
    from cpattn.cp.context import ContextParallel
    from cpattn.cp.mesh import Topology
    from cpattn.cp.ring import ring_spec
    from cpattn.state import _validate_options

    group = Group(None, 0, 2, "nccl")
    assert ring_spec(ContextParallel(Topology(group, None, 1)), 8).step_streams == 2
    monkeypatch.setattr("cpattn.cp.context.topology_from_mesh", lambda mesh: Topology(group, None, 1))
    assert ring_spec(ContextParallel.from_mesh(object(), cp_ring_streams=1), 8).step_streams == 1
    assert _validate_options({"cp_ring_streams": 1}) == {"cp_ring_streams": 1}
    for bad in (3, 0, True, "2"):
        with pytest.raises(cpattn.InvalidArgumentError, match="cp_ring_streams"):
            _validate_options({"cp_ring_streams": bad})
