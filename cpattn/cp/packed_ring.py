"""The packed ring: attention over a document-sharded packed stream, key blocks sent only where documents meet.

Every rank holds its shard of the stream in the document layout (cp/packed_layout.py). At step i of W, rank r
computes its queries against the keys of rank s = r - i, which it receives straight from s, and sends its own
keys straight to rank r + i. What a step computes and which keys it needs come from the step's plan
(cp/packed_plan.py), the same on both ends since both read only the global document boundaries: a step whose
plan is empty is skipped by both, nothing computed and nothing sent; otherwise only the ranges of keys the plan
reads travel, as views of the owner's shard (within its split documents), received one after another into one
block. Every rank walks the same steps in the same order, skipped or not, so the transfers two ranks post always
match.

Forward: the next step's transfer starts before this step's kernels run (it overlaps them); each chain's
(out, lse) merges into float32 rows (float64 for float64 inputs). K/V memory: the rank's own shard and two
received blocks, the one computed on and the one arriving (each within the owner's split documents, never its
whole documents); blocks are new tensors each step, freed when the step is done. The last step's block is
kept for the backward.

Backward, with the global (out, lse): the steps in reverse, starting on the kept block (so no transfer precedes
the first kernel) and ending on the rank's own shard. Each step's dK/dV parts go straight back to their owner in
the inputs' dtype, while the next step computes; the owner receives the parts for its own keys from the rank
computing on them (r + i) and adds each range's rows where that range came from, and its dQ parts, in float32,
rounded once at the end (as the dense ring does, cp/ring.py); where the kernel keeps one dQ accumulator over
the rank's rows (`BlockKernel.shared_rows`, FA4's sm90 varlen kernels), the chains that fit it add into it
instead and their dQ is rounded once, with no dQ parts to sum. Per-chain gradients come from the kernel's
backward given the global (out, lse), which is exact: a block's probabilities are exp(score - global lse).

Score modifications. A window is per document: the step plans cut every piece to its band and drop the pieces,
and the steps, it does not reach (cp/packed_plan.py), so a skipped step sends nothing here too, and a step sends
only the keys its trimmed pieces read. A softcap goes to every kernel call (the kernel's call carries it). Sinks
never reach a kernel: they join once per row, in the final merge, as one more log-sum-exp term on the merged
(out, lse) (ops/sinks.add_sinks); the backward then runs with that log-sum-exp (T) and the final out, which gives
the exact q, k, v gradients, and each rank computes its own rows' share of the sinks' gradient
(ops/sinks.sink_grad). The sinks are a parameter replicated on every rank: the usual gradient all-reduce of the
parameters over the group adds the shares, which is the whole gradient since every row lives on one rank only
(as in the dense ring, cp/ring.py). Rows that see no key and no sink come out 0 with lse -inf, never NaN.

This module never names a provider: the kernel comes in as a `BlockKernel` (cp/packed_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..contract import autocast_off
from ..ops.gradsum import DeferredRowSum
from ..ops.merge import PartialAttention
from ..ops.sinks import add_sinks, sink_grad
from .comm import CommStats, RingChannel
from .mesh import Group
from .packed_kernels import BlockKernel
from .packed_layout import DocumentLayout
from .packed_plan import StepPlan, step_plan


@dataclass
class PackedRingSpec:
    group: Group | None  # None: one rank, nothing to exchange
    layout: DocumentLayout
    causal: bool
    timeout: float | None  # None: see comm._wait
    stats: CommStats
    channel_factory: Callable[..., RingChannel] = RingChannel  # swappable: a benchmark runs ranks with no network
    # with no network (a benchmark): (this rank, owner) -> the step's key block (k, v) as it would arrive, so no
    # receive is posted; None: received from the owner
    block_source: "Callable[[int, int], tuple[torch.Tensor, torch.Tensor]] | None" = None
    window: "tuple[int | None, int | None] | None" = None  # per document, (left, right) in document offsets

    @property
    def rank(self) -> int:
        return self.group.rank if self.group is not None else 0

    @property
    def world(self) -> int:
        return self.layout.world

    def plan(self, consumer: int, owner: int) -> StepPlan | None:
        return step_plan(self.layout, consumer % self.world, owner % self.world, self.causal, self.window)

    def channel(self) -> RingChannel | None:
        return self.channel_factory(self.group, self.timeout, self.stats) if self.world > 1 else None


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """What results are merged and gradients summed in: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _merge(out_a, lse_a, out_b, lse_b):
    """ops.merge.merge_two's guarded merge (an empty side weighs 0, never NaN), in out_a's dtype: float64 inputs
    keep float64 where merge_two works in float32."""
    dtype = out_a.dtype
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), 0.0, m)
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)
    z = w_a + w_b
    lse = torch.where(z == 0, float("-inf"), m + torch.log(z))
    inv = 1.0 / z.clamp_min(torch.finfo(dtype).tiny)
    return out_a * (w_a * inv).unsqueeze(-1) + out_b.to(dtype) * (w_b * inv).unsqueeze(-1), lse


class _RowMerge:
    """(out, lse) of every local row, merged one chain's rows at a time (a chain covers some rows only: merging
    costs its rows, not the shard's), in `_sum_dtype`. Rows no chain covers stay out 0, lse -inf."""

    def __init__(self, rows: int, heads: int, value_dim: int, dtype: torch.dtype, device):
        dtype = _sum_dtype(dtype)
        self.out = torch.zeros(heads, rows, value_dim, dtype=dtype, device=device)
        self.lse = torch.full((heads, rows), float("-inf"), dtype=dtype, device=device)

    def add(self, start: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        rows = slice(start, start + out.shape[0])
        self.out[:, rows], self.lse[:, rows] = _merge(self.out[:, rows], self.lse[:, rows], out.transpose(0, 1),
                                                      lse)

    def result(self, dtype: torch.dtype, sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(out (rows, heads, dim) in `dtype`, lse (heads, rows) float32); with `sinks`, joined here once as one
        more log-sum-exp term, and the lse returned holds them (what the backward takes)."""
        merged, lse = self.out, self.lse
        if sinks is not None:
            with_sinks, total = add_sinks(merged.unsqueeze(0), lse.unsqueeze(0), sinks)
            merged, lse = with_sinks[0], total[0]
        out = torch.empty(merged.shape[1], merged.shape[0], merged.shape[2], dtype=dtype, device=merged.device)
        out.copy_(merged.transpose(0, 1))
        return out, lse.float()  # the contract's log-sum-exp: float32


class _FusedRowMerge:
    """_RowMerge through cpattn.ops.merge.PartialAttention: the chains' results are kept and merged when the
    result is asked for, up to MAX_BLOCKS in one Triton launch on CUDA (_RowMerge's torch ops take about fifteen
    launches per chain, which a ring with many short steps pays on the host). For inputs below float64 (the
    merge runs in float32, as _RowMerge's does for them). Without sinks the result is written straight into the
    packed (rows, heads, dim) layout, or is the one chain's kernel output where a single chain covers every row:
    no transposing copy after the merge. Where the first chain (the diagonal step's) covers every row and the
    others some, the merge is written into that chain's output, on the rows the others cover only."""

    def __init__(self, rows: int, heads: int, value_dim: int, device):
        self._shape, self._device = (rows, heads, value_dim), device
        self._acc = PartialAttention(1, heads, rows, value_dim, device)

    def add(self, start: int, out: torch.Tensor, lse: torch.Tensor) -> None:
        self._acc.add_rows(slice(start, start + out.shape[0]), out.transpose(0, 1).unsqueeze(0), lse.unsqueeze(0))

    def result(self, dtype: torch.dtype, sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if sinks is None:
            lone = self._acc.lone_block()  # one chain over every row: its kernel's output, in this layout already
            if lone is not None and lone[0].dtype == dtype and lone[0][0].transpose(0, 1).is_contiguous():
                return lone[0][0].transpose(0, 1), lone[1][0].float()
            first = self._acc.first_block()
            if first is not None and first[0][0].transpose(0, 1).is_contiguous():
                # a chain over every row (the diagonal step's) in this layout, the others on some rows: merged in
                # its own storage (a kernel output the ring owns), on the rows the others cover
                merged = self._acc.result_in_first(dtype)
                if merged is not None:
                    return merged[0][0].transpose(0, 1), merged[1][0]
            out = torch.empty(self._shape, dtype=dtype, device=self._device)  # the merge writes here, no copy after
            _, lse = self._acc.result(dtype, out=out.transpose(0, 1).unsqueeze(0))
            return out, lse[0]
        merged, lse = self._acc.result(torch.float32)
        merged, lse = add_sinks(merged, lse, sinks)
        out = torch.empty(self._shape, dtype=dtype, device=merged.device)
        out.copy_(merged[0].transpose(0, 1))
        return out, lse[0].float()


def _row_merge(q: torch.Tensor, value_dim: int):
    if q.dtype == torch.float64:
        return _RowMerge(q.shape[0], q.shape[1], value_dim, q.dtype, q.device)
    return _FusedRowMerge(q.shape[0], q.shape[1], value_dim, q.device)


class _FusedRowSum:
    """_RowSum through cpattn.ops.gradsum.DeferredRowSum (up to MAX_PARTS parts in one launch on CUDA), a packed
    (rows, heads, dim) gradient seen as (1, 1, rows, heads * dim) rows: a contiguous view of the parts and of the
    result (read per head instead, the sums took as long and the result needed a transposing copy). For inputs
    below float64."""

    def __init__(self, like: torch.Tensor):
        self._like = like
        # the parts are new tensors (kernel outputs, received buffers) the ring never reads again
        self._sum = DeferredRowSum((1, 1, like.shape[0], like[0].numel()), like.device, one_stream=True,
                                   writable_parts=True)

    def add(self, start: int, part: torch.Tensor) -> None:
        self._sum.add(slice(start, start + part.shape[0]), part.reshape(1, 1, part.shape[0], -1))

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        return self._sum.result(dtype).view(self._like.shape)


def _row_sum(like: torch.Tensor):
    return _RowSum(like) if like.dtype == torch.float64 else _FusedRowSum(like)


class _RowSum:
    """A sum of row parts of one (rows, heads, dim) gradient in `_sum_dtype`, made at the first part, rounded
    once."""

    def __init__(self, like: torch.Tensor):
        self._like, self._sum = like, None

    def add(self, start: int, part: torch.Tensor) -> None:
        if self._sum is None:
            self._sum = torch.zeros(self._like.shape, dtype=_sum_dtype(self._like.dtype), device=self._like.device)
        self._sum[start:start + part.shape[0]] += part

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        if self._sum is None:
            return torch.zeros(self._like.shape, dtype=dtype, device=self._like.device)
        return self._sum.to(dtype)


def _exchange(spec: PackedRingSpec, channel, step: int, k: torch.Tensor, v: torch.Tensor):
    """Start step `step`'s key transfer: the ranges of this rank's keys that rank + step reads (views), and the
    ranges of rank - step's keys that this rank reads, received one after another into one block. Returns
    (pending exchange or None, the block (k, v) being received or None)."""
    me = spec.rank
    out_plan, in_plan = spec.plan(me + step, me), spec.plan(me, me - step)
    send = []
    if out_plan is not None:
        send = [x[a:b] for x in (k, v) for a, b in out_plan.kv]
    recv, block = [], None
    if in_plan is not None and spec.block_source is not None:
        block = spec.block_source(me, (me - step) % spec.world)
    elif in_plan is not None:
        block = tuple(x.new_empty((in_plan.kv_len,) + x.shape[1:]) for x in (k, v))
        recv = [x[start:start + n] for x in block for start, _, n in in_plan.owner_rows(0, in_plan.kv_len)]
    if not send and not recv:
        return None, block  # nothing on the wire: the block, if any, came prebuilt
    return channel.send_recv(send, (me + step) % spec.world, recv, (me - step) % spec.world, "kv"), block


def _own_block(plan: StepPlan, k, v):
    (a, b), = plan.kv  # the diagonal step: one range of the rank's own shard
    return k[a:b], v[a:b]


def packed_ring_forward(kernel: BlockKernel, spec: PackedRingSpec, q, k, v, sinks: torch.Tensor | None = None):
    """(out in q's dtype, lse (Hq, rows) float32, the last step's block or None) of this rank's shard; `sinks`
    (Hq,) join the merged rows once (the lse returned then holds them)."""
    me, world = spec.rank, spec.world
    channel = spec.channel()
    acc = _row_merge(q, v.shape[-1])
    block = None
    for step in range(world):
        pending, arriving = _exchange(spec, channel, step + 1, k, v) if step + 1 < world else (None, None)
        plan = spec.plan(me, me - step)
        spec.stats["packed_steps" if plan is not None else "packed_skipped_steps"] += 1
        if plan is not None:
            kb, vb = _own_block(plan, k, v) if step == 0 else block
            for c in plan.chains:
                out_c, lse_c = kernel.forward(q[c.q0:c.q1], kb[c.k0:c.k1], vb[c.k0:c.k1], c)
                acc.add(c.q0, out_c, lse_c)
        if pending is not None:  # a send-only exchange is waited for too
            pending.wait()
        if step + 1 < world:
            block = arriving
    out, lse = acc.result(q.dtype, sinks)
    return out, lse, (block if world > 1 else None)  # after the last step: that step's block (or None)


class _OwnGrads:
    """dK and dV of this rank's shard: its own step's parts, and the parts other ranks send back as they compute
    on its keys. A step's incoming parts are collected at the next step, so the transfer overlaps its kernels."""

    def __init__(self, k, v):
        self.dk, self.dv = _row_sum(k), _row_sum(v)
        self._like = k, v
        self._in_flight = None

    def add(self, start: int, dk, dv) -> None:
        self.dk.add(start, dk)
        self.dv.add(start, dv)

    def buffers(self, plan: StepPlan | None) -> list[torch.Tensor]:
        """Receive buffers for the parts a rank computes on this rank's keys with `plan`: dk, dv per chain."""
        if plan is None:
            return []
        k, v = self._like
        return [x.new_empty((c.k1 - c.k0,) + x.shape[1:]) for c in plan.chains for x in (k, v)]

    def expect(self, exchange, plan: StepPlan | None) -> None:
        self.collect()
        self._in_flight = (exchange, plan)

    def collect(self) -> None:
        if self._in_flight is None:
            return
        exchange, plan = self._in_flight
        self._in_flight = None
        if exchange is None:
            return
        parts = exchange.wait()  # a send-only exchange is waited for too: until then its parts may not have left
        if plan is None:
            return
        for i, c in enumerate(plan.chains):  # a chain's keys, in block order, land on the ranges they came from
            for start, row, n in plan.owner_rows(c.k0, c.k1):
                first = start - c.k0
                self.add(row, parts[2 * i][first:first + n], parts[2 * i + 1][first:first + n])


def packed_ring_backward(kernel: BlockKernel, spec: PackedRingSpec, q, k, v, dout, out, lse, last_block):
    """(dq, dk, dv) of this rank's shard, in the inputs' dtype (see the module docstring)."""
    me, world = spec.rank, spec.world
    channel = spec.channel()
    dq = _row_sum(q)
    shared = _shared_rows(kernel, spec, q, dout, out, lse)
    own = _OwnGrads(k, v)
    block = last_block
    for step in range(world - 1, -1, -1):
        pending, arriving = _exchange(spec, channel, step - 1, k, v) if step - 1 >= 1 else (None, None)
        plan = spec.plan(me, me - step)
        parts = []
        if plan is not None:
            kb, vb = _own_block(plan, k, v) if step == 0 else block
            for c in plan.chains:
                rows = slice(c.q0, c.q1)
                grads = shared.backward(kb[c.k0:c.k1], vb[c.k0:c.k1], c) if shared is not None else None
                if grads is None:
                    dq_c, dk_c, dv_c = kernel.backward(dout[rows], q[rows], kb[c.k0:c.k1], vb[c.k0:c.k1],
                                                       out[rows], lse[:, rows], c)
                    dq.add(c.q0, dq_c)
                else:  # dQ went into the rank's accumulator
                    dk_c, dv_c = grads
                if step == 0:
                    own.add(plan.kv[0][0] + c.k0, dk_c, dv_c)
                else:  # sent in the inputs' dtype, summed in float32 by the owner
                    parts += [dk_c.to(k.dtype).contiguous(), dv_c.to(v.dtype).contiguous()]
        if step > 0:
            owner_plan = spec.plan(me + step, me)  # what rank + step computes on my keys at this step
            receive = own.buffers(owner_plan)
            exchange = None
            if parts or receive:
                exchange = channel.send_recv(parts, (me - step) % world, receive, (me + step) % world, "dkv")
            own.expect(exchange, owner_plan)
        if pending is not None:
            pending.wait()
        block = arriving
    own.collect()
    if shared is not None and shared.added:
        dq.add(0, shared.dq())
    return dq.result(q.dtype), own.dk.result(k.dtype), own.dv.result(v.dtype)


def _shared_rows(kernel: BlockKernel, spec: PackedRingSpec, q, dout, out, lse):
    """The kernel's one dQ accumulator over this rank's rows (BlockKernel.shared_rows), framed by the diagonal
    step's chain where that is one chain over every row, else None. Inputs below float64 only: float64 runs
    sum in float64 (_RowSum)."""
    plan = spec.plan(spec.rank, spec.rank)
    if q.dtype == torch.float64 or plan is None or len(plan.chains) != 1:
        return None
    return kernel.shared_rows(dout, q, out, lse, plan.chains[0])


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """Packed (rows, heads, dim) as the (1, heads, rows, dim) view ops/sinks.py reads."""
    return x.transpose(0, 1).unsqueeze(0)


class PackedRingAttention(torch.autograd.Function):
    """Autograd over the packed ring: the forward keeps its last block (and joins the sinks once), the backward
    starts on it, with the log-sum-exp that holds the sinks, and takes this rank's rows' share of their
    gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, kernel, spec):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse, last = packed_ring_forward(kernel, spec, q, k, v, sinks)
        ctx.kernel, ctx.spec = kernel, spec
        ctx.save_for_backward(q, k, v, out, lse, sinks, *(last or ()))
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sinks, *last = ctx.saved_tensors
        dout = dout.contiguous()
        dq = dk = dv = dsinks = None
        with autocast_off(q.device):
            if any(ctx.needs_input_grad[:3]):
                dq, dk, dv = packed_ring_backward(ctx.kernel, ctx.spec, q, k, v, dout, out, lse,
                                                  tuple(last) or None)
            if ctx.needs_input_grad[3]:
                dsinks = sink_grad(_bhsd(dout), _bhsd(out), lse.unsqueeze(0), sinks)
        return dq, dk, dv, dsinks, None, None


def packed_ring_attention(kernel: BlockKernel, spec: PackedRingSpec, q, k, v,
                          sinks: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's packed output (rows, Hq, Dv); every rank of the group must call it. `sinks`: (Hq,) logits,
    replicated on every rank; their gradient here is this rank's rows' share (see the module docstring)."""
    wants = (q, k, v) + ((sinks,) if sinks is not None else ())
    if torch.is_grad_enabled() and any(t.requires_grad for t in wants):
        return PackedRingAttention.apply(q, k, v, sinks, kernel, spec)
    with torch.no_grad():
        return packed_ring_forward(kernel, spec, q.contiguous(), k.contiguous(), v.contiguous(), sinks)[0]
