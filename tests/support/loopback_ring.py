"""LoopbackRing: a stand-in ring channel with no network, to run one rank's ring steps alone; Received, an exchange
that is already complete."""

from __future__ import annotations


class Received:
    """An exchange that is already complete: `wait()` hands back what it 'received' (the loopback channels of the
    ring, packed-ring and windowed-ring benchmarks return it)."""

    __slots__ = ("received",)

    def __init__(self, received):
        self.received = received

    def wait(self):
        return self.received


class LoopbackRing:
    """A stand-in ring channel with no network, to run one rank's ring steps alone; usable as
    `RingSpec.channel_factory`. A KV exchange 'receives' the block the sending peer holds at that moment,
    known from the block being sent: the forward passes blocks on to rank r+1 and gets the one before, the
    backward passes them to rank r-1 and gets the one after. A dK/dV exchange hands its receive buffers back
    unfilled (no other rank computed parts), so of a backward only this rank's dQ is meaningful.

    `blocks`: every rank's (key, value), the very tensors the ring is given (they are recognised by storage)."""

    def __init__(self, blocks, rank: int):
        self._blocks, self._rank = blocks, rank

    def __call__(self, group, timeout, stats):
        return self

    def exchange(self, send, recv, kind):
        world = len(self._blocks)
        return self.send_recv(send, (self._rank + 1) % world, recv, (self._rank - 1) % world, kind)

    def send_recv(self, send, to_rank, recv, from_rank, kind):
        if kind != "kv":
            return Received(recv)
        world = len(self._blocks)
        held = [i for i, (k, _) in enumerate(self._blocks) if k.data_ptr() == send[0].data_ptr()]
        if not held:
            raise ValueError("LoopbackRing: the block sent is none of the blocks it was given")
        step = -1 if to_rank == (self._rank + 1) % world else 1
        return Received(list(self._blocks[(held[0] + step) % world]))
