"""Every byte the schedules move goes through here: ring exchanges, all-to-all, all-gather, agreement checks.

Host-side waits are bounded: a peer that never answers becomes a CommTimeoutError naming it, not a hang until a
watchdog fires. On NCCL the data-moving waits are stream-ordered unless cp_timeout was given (see `_wait`); the
agreement check that opens every call is a bounded host wait on every backend. With gloo and CUDA tensors,
point-to-point traffic is staged through CPU tensors (gloo's send/recv of CUDA tensors crashes); collectives take
CUDA tensors directly.
"""

from __future__ import annotations

import collections
import datetime
import time

import torch
import torch.distributed as dist

from ..errors import CommTimeoutError
from .mesh import Group


# Backends whose Work.wait() without a timeout only makes the current CUDA stream wait for the transfer.
_STREAM_ORDERED = frozenset({"nccl"})
DEFAULT_TIMEOUT = 60.0  # seconds, where a wait is bounded and no cp_timeout was given


def _wait(work, timeout: float | None, what: str, group: Group) -> None:
    """Wait for `work`; on a timeout or failure raise CommTimeoutError naming the peers that never reported.

    `timeout=None` (no cp_timeout given): on NCCL the wait only orders the compute stream after the transfer
    and returns at once; elsewhere it is bounded by DEFAULT_TIMEOUT. A timed NCCL wait blocks the host and
    polls the transfer with sleeps (10 ms in PyTorch's ProcessGroupNCCL): every wait holds the host up to a
    poll interval while the GPU runs out of queued work. So on NCCL a peer lost mid-call is reported by NCCL's
    watchdog after the process group's own timeout, unless the caller asked for bounded waits by giving
    cp_timeout.
    Ranks that disagree are caught before any data moves by the agreement check, which is always bounded.
    """
    if timeout is None:
        if group.backend in _STREAM_ORDERED:
            work.wait()
            return
        timeout = DEFAULT_TIMEOUT
    start = time.monotonic()
    try:
        ok, cause = work.wait(timeout=datetime.timedelta(seconds=timeout)), None
    except RuntimeError as exc:
        ok, cause = False, exc
    if ok is False:
        waited = time.monotonic() - start
        how = "timed out" if waited >= timeout else "failed"
        raise CommTimeoutError(
            f"rank {group.rank} of a {group.size}-rank group: {what} {how} after {waited:.1f}s "
            f"(cp_timeout={timeout:g}s); {_absent_peers(group, start + timeout + min(timeout, 2.0))}"
            + (f" ({cause})" if cause else "")
        ) from cause


_FAILED_WAITS: collections.Counter = collections.Counter()


def _absent_peers(group: Group, deadline: float) -> str:
    """After a failed wait, name the peers that are gone. Every rank of the group whose wait fails reports in
    through the torch.distributed store (its wait is bounded by the same timeout, so it does so by `deadline`);
    a rank that died, hangs or never reached this call does not. Runs only on the failure path."""
    absent = None
    try:
        store = dist.distributed_c10d._get_default_store()
        members = [group.global_rank(r) for r in range(group.size)]
        key = "cpattn/failed/" + ",".join(map(str, members))
        _FAILED_WAITS[key] += 1
        prefix = f"{key}/{_FAILED_WAITS[key]}/"
        store.set(prefix + str(members[group.rank]), "1")
        while True:
            absent = [r for r, g in enumerate(members) if not store.check([prefix + str(g)])]
            if not absent or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    except Exception as exc:  # the store's host (global rank 0, or torchrun's agent) is gone too
        if absent is None:
            return f"could not reach the torch.distributed store to find the missing rank ({type(exc).__name__})"
    if not absent:
        return "every rank of the group reached this point, so the transfer itself failed"
    ranks = ", ".join(f"{r} (global rank {members[r]})" for r in absent)
    return f"no word from rank(s) {ranks}: dead, hung, or not making this call"


class CommStats(collections.Counter):
    """Counts of what a ContextParallel instance sent (tests assert on them; cheap to keep)."""


class PendingExchange:
    """Sends and receives in flight; `wait()` returns the received tensors on their device."""

    def __init__(self, works, received, staged, timeout, group, peers, what: str | None = None):
        self._works, self._received, self._staged = works, received, staged
        self._timeout, self._group, self._peers = timeout, group, peers
        self._what = what or f"ring exchange (send to rank {peers[0]}, receive from rank {peers[1]})"

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            _wait(work, self._timeout, self._what, self._group)
        if self._staged is not None:
            for dst, src in zip(self._received, self._staged):
                dst.copy_(src)
        return self._received


class RingChannel:
    """Point-to-point exchanges of a ring: with the neighbours (send to rank+1, receive from rank-1) or with any
    two ranks of the group (the ring backward sends each gradient part straight to its block's owner)."""

    def __init__(self, group: Group, timeout: float | None, stats: CommStats):
        self.group, self.timeout, self.stats = group, timeout, stats

    def exchange(self, send: list[torch.Tensor], recv: list[torch.Tensor], kind: str) -> PendingExchange:
        """Start sending `send` to the next rank and receiving into `recv` from the previous one."""
        return self.send_recv(send, self.group.next, recv, self.group.prev, kind)

    def send_recv(self, send: list[torch.Tensor], to_rank: int, recv: list[torch.Tensor], from_rank: int,
                  kind: str) -> PendingExchange:
        """Start sending `send` to group rank `to_rank` and receiving into `recv` from group rank `from_rank`;
        either list may be empty (the peer's side posts nothing either). `kind` names the traffic in the stats."""
        peers = (self.group.global_rank(to_rank), self.group.global_rank(from_rank))
        stage = self.group.backend == "gloo" and any(t.is_cuda for t in send + recv)
        send_t = [t.cpu() for t in send] if stage else send
        recv_t = [torch.empty(t.shape, dtype=t.dtype) for t in recv] if stage else recv
        ops = [dist.P2POp(dist.isend, t, peers[0], self.group.pg) for t in send_t]
        ops += [dist.P2POp(dist.irecv, t, peers[1], self.group.pg) for t in recv_t]
        works = dist.batch_isend_irecv(ops) if ops else []
        if send:
            self.stats[f"{kind}_sends"] += 1
            self.stats[f"{kind}_bytes"] += sum(t.numel() * t.element_size() for t in send)
        return PendingExchange(works, recv, recv_t if stage else None, self.timeout, self.group, peers)

    def post(self, sends: dict[int, list[torch.Tensor]], recvs: dict[int, list[torch.Tensor]],
             kind: str) -> PendingExchange:
        """Start sending `sends[peer]` to each peer and receiving into `recvs[peer]` from each, all at once (the
        windowed exchange, cp/halo.py: each rank talks only to the ranks in reach). Peers are group ranks; a
        peer's tensors are sent and received in list order. `wait()` gives the received tensors flat, in the
        order of `recvs`. The stats count each peer's bytes apart too (`<kind>_bytes_to_<peer>`)."""
        received = [t for peer in recvs for t in recvs[peer]]
        every = [t for ts in sends.values() for t in ts] + received
        stage = self.group.backend == "gloo" and any(t.is_cuda for t in every)  # as send_recv: gloo via CPU
        ops = []
        for peer, tensors in sends.items():
            to = self.group.global_rank(peer)
            ops += [dist.P2POp(dist.isend, t.cpu() if stage else t, to, self.group.pg) for t in tensors]
            sent = sum(t.numel() * t.element_size() for t in tensors)
            self.stats[f"{kind}_sends"] += 1
            self.stats[f"{kind}_bytes"] += sent
            self.stats[f"{kind}_bytes_to_{peer}"] += sent
        targets = [torch.empty(t.shape, dtype=t.dtype) for t in received] if stage else received
        slots = iter(targets)
        for peer, tensors in recvs.items():
            ops += [dist.P2POp(dist.irecv, next(slots), self.group.global_rank(peer), self.group.pg)
                    for _ in tensors]
        works = dist.batch_isend_irecv(ops) if ops else []
        what = f"windowed exchange (send to group ranks {sorted(sends)}, receive from {sorted(recvs)})"
        return PendingExchange(works, received, targets if stage else None, self.timeout, self.group, (), what)


def all_to_all_flat(x: torch.Tensor, out_numel: list[int], in_numel: list[int], group: Group,
                   timeout: float | None):
    """all_to_all_single on flat buffers with per-rank element counts (uneven splits allowed)."""
    out = x.new_empty(sum(out_numel))
    work = dist.all_to_all_single(out, x, out_numel, in_numel, group=group.pg, async_op=True)
    _wait(work, timeout, "all-to-all", group)
    return out


class InFlight:
    """An all-to-all started by `AllToAllStart` and not yet waited for by `AllToAllWait`."""

    work = None


class AllToAllStart(torch.autograd.Function):
    """Differentiable start of an all-to-all on flat buffers: returns the receive buffer, which holds the data only
    after `AllToAllWait`, so the caller can queue other work between the two (Ulysses overlaps one head chunk's
    transfer with another's attention). Its gradient is the all-to-all with splits swapped, waited at once."""

    @staticmethod
    def forward(ctx, x, out_numel, in_numel, group, timeout, stats, flight):
        ctx.args = (out_numel, in_numel, group, timeout, stats)
        stats["all_to_all"] += 1
        out = x.new_empty(sum(out_numel))
        flight.work = dist.all_to_all_single(out, x.contiguous(), out_numel, in_numel, group=group.pg,
                                             async_op=True)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_numel, in_numel, group, timeout, stats = ctx.args
        stats["all_to_all"] += 1
        return (all_to_all_flat(grad.contiguous(), in_numel, out_numel, group, timeout),) + (None,) * 6


class AllToAllWait(torch.autograd.Function):
    """Waits for the all-to-all that filled `received` (see `_wait`); the identity for gradients."""

    @staticmethod
    def forward(ctx, received, flight, group, timeout):
        _wait(flight.work, timeout, "all-to-all", group)
        flight.work = None
        return received.view_as(received)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def all_gather_padded(x: torch.Tensor, lengths: list[int], dim: int, group: Group,
                      timeout: float | None) -> list[torch.Tensor]:
    """All-gather tensors whose size along `dim` differs per rank (`lengths`); returns one per rank."""
    longest = max(lengths)
    pad = longest - x.shape[dim]
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    x = x.contiguous()  # before empty_like, which would copy a view's strides into the receive buffers
    bufs = [torch.empty_like(x) for _ in range(group.size)]
    work = dist.all_gather(bufs, x, group=group.pg, async_op=True)
    _wait(work, timeout, "all-gather", group)
    return [b.narrow(dim, 0, n) for b, n in zip(bufs, lengths)]


def all_reduce_sum(x: torch.Tensor, group: Group, timeout: float | None) -> torch.Tensor:
    work = dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group.pg, async_op=True)
    _wait(work, timeout, "all-reduce", group)
    return x


def gather_signatures(sig: list[int], group: Group, timeout: float, device: torch.device) -> torch.Tensor:
    """Every rank's integer signature of a call, as a (ranks, len) tensor (one small all-gather)."""
    on = device if group.backend != "gloo" else torch.device("cpu")
    mine = torch.tensor(sig, dtype=torch.int64, device=on)
    bufs = [torch.empty_like(mine) for _ in range(group.size)]
    work = dist.all_gather(bufs, mine, group=group.pg, async_op=True)
    _wait(work, timeout, "agreement check (a rank did not reach this attention call)", group)
    return torch.stack(bufs).cpu()
