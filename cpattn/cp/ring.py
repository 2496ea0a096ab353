"""Ring attention: each rank keeps its queries, KV blocks travel round the ring, partial results merge.

Forward, at step i of W, rank r holds the KV block of source s = (r - i) mod W. Before computing on it, the
rank starts sending that block to rank r+1 and receiving the next one from rank r-1 (so the transfer
overlaps the kernel), computes attention of its queries against the block, and merges the (out, lse) into
a float32 accumulator. W-1 exchanges in all; the last block is never sent on.

Backward, with the global (out, lse) from the forward: Q, dO, out and lse stay put and the forward's steps run
in reverse. The forward's last block (source r + 1) is kept for the backward, which starts on it, passes each
block on to rank r - 1 and receives the next from rank r + 1, and ends on the rank's own block: W-2 transfers
of KV instead of W-1, none before the first kernel, and the own block's kernel (the diagonal one under zigzag)
covers the last gradient transfer, which would otherwise be waited for in the open after the last kernel.
The kept block costs one KV shard of memory from forward to backward.
A step's dK/dV part belongs to the owner of the block it was computed against: at step i rank r sends its part
for block s = r + 1 + i straight to rank s, in the inputs' dtype, while the next step computes, and receives the
part of its own block from rank r - 1 - i. Each rank sums its own block's parts, and its dQ parts, once at the
end in float32 (`gradsum.DeferredRowSum`). Accumulators travelling with the blocks instead would carry float32 on every
middle hop and be read and written at every step: this sends half the bytes and sums each gradient in one pass.
Per-block gradients come from the provider's backward given the global (out, lse), which is exact: softmax
probabilities of a block are exp(score - global lse). They go through the provider's `shared_rows_backward`, which sums
dQ over the steps: by default the parts as above; a kernel with a float32 dQ accumulator of its own may keep one
for all the steps (see contract.SharedRowsBackward). On CUDA the backward's steps take two streams in turn, so that a
step's kernel starts while the previous one's last wave still runs (cpattn/cp/streams.py says why, what keeps
that exact, and from what size of shard); the forward runs on one.

Causal with the zigzag layout: only the unmasked part of each block is computed (see `block_plan`), so every
rank does one diagonal block and W-1 half blocks.

With a replicated prefix or suffix (cp/prefix.py) their KV is one more block, local to every rank and never sent.

Score modifications. A softcap goes to every block call as it is (it is exact per block: the merge is unchanged).
Sinks never reach a block: they join once, in the final merge, as one more log-sum-exp term on the merged
(out, lse) (ops/sinks.add_sinks); the backward then runs with that lse (T) and the final out, which gives the
exact q, k, v gradients, and each rank computes its own rows' share of the sinks' gradient (ops/sinks.sink_grad),
which the gradient all-reduce of the replicated parameter adds up. A window that restricts the keys runs as the
windowed exchange instead of the rotation (halo.py: only the keys in reach move, between the ranks in reach);
one that restricts nothing for the length is dropped. Every block call goes through scoremods.as_kernel_call.

`RING` is the schedule: it needs a provider that returns a log-sum-exp and, for gradients, has a backward that
takes the global (out, lse). This module never names a provider.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from ..contract import AttentionCall, Provider, autocast_off
from ..masks import is_mask_mod, materialize_mask_mod, select_keys, select_queries
from ..ops import gradsum
from ..ops.merge import PartialAttention, merge_two
from ..ops.sinks import add_sinks, sink_grad
from ..scoremods import as_kernel_call
from .comm import CommStats, RingChannel
from .halo import halo_backward, halo_forward, restricting_band
from .layout import ring_chunks, ring_positions
from .mesh import Group
from .prefix import join_replicated, split_replicated
from .rows import StationaryRows, stationary_rows
from .schedule import Agreed, KernelShape, Setup, Suggest, with_example
from .streams import StepStreams, stream_count


@dataclass(frozen=True)
class BlockPlan:
    """Which local query rows attend which columns of a source's KV block, and whether causally."""

    rows: slice
    cols: slice
    causal: bool


@dataclass
class RingSpec:
    group: Group
    layout: str
    total: int  # global sequence length
    timeout: float | None  # None: see comm._wait
    stats: CommStats
    # Builds the point-to-point channel; swappable so a benchmark can run one rank's work with no network.
    channel_factory: Callable[..., RingChannel] = RingChannel
    # CUDA streams the backward's steps take in turn (cpattn/cp/streams.py), for shards with enough work per
    # step (streams.MIN_STEP_WORK); 1 runs every step on one stream.
    step_streams: int = 2
    # Windowed calls (halo.py): True runs each query chunk as one kernel call on its keys laid end to end (a copy
    # of them) instead of one call per run of keys, merged. Off: the copies cost more than the calls they save
    # (docs/windows-softcap-sinks.md: zigzag 0.700 fused against 0.845 separate on one H100).
    fuse_halo: bool = False

    def channel(self) -> RingChannel:
        return self.channel_factory(self.group, self.timeout, self.stats)

    @functools.cached_property
    def _chunks(self) -> tuple:
        return tuple(ring_chunks(self.total, self.group.size, r, self.layout) for r in range(self.group.size))

    def length(self, rank: int) -> int:
        return sum(c.size for c in self._chunks[rank])

    def first_chunk(self, rank: int) -> int:
        return self._chunks[rank][0].size

    @functools.cached_property
    def max_length(self) -> int:
        return max(self.length(r) for r in range(self.group.size))

    def key_positions(self, rank: int, device) -> torch.Tensor:
        return ring_positions(self.total, self.group.size, rank, self.layout, device)


def block_plan(spec: RingSpec, me: int, src: int, causal: bool, q_len: int | None = None) -> BlockPlan | None:
    """The part of (my queries x source's keys) that causal attention does not mask out entirely.
    `q_len`: my query rows when they are more than my shard (a replicated prefix; non-causal only)."""
    rows, cols = slice(0, spec.length(me) if q_len is None else q_len), slice(0, spec.length(src))
    if not causal:
        plan = BlockPlan(rows, cols, False)
    elif src == me:  # local queries against local keys: same positions, so top-left causal is exact
        plan = BlockPlan(rows, cols, True)
    elif spec.layout == "contiguous":
        plan = BlockPlan(rows, cols, False) if src < me else None
    elif src < me:  # zigzag: only the source's first chunk precedes my queries
        plan = BlockPlan(rows, slice(0, spec.first_chunk(src)), False)
    else:  # zigzag, src > me: only my second (late) chunk follows all of the source's keys
        plan = BlockPlan(slice(spec.first_chunk(me), spec.length(me)), cols, False)
    if plan is None or plan.rows.stop <= plan.rows.start or plan.cols.stop <= plan.cols.start:
        return None
    return plan


def _block_call(provider: Provider, call: AttentionCall, spec: RingSpec, src: int, k, v, plan: BlockPlan,
                rows: StationaryRows) -> AttentionCall:
    mask = call.attn_mask
    if is_mask_mod(mask):  # evaluated on this block only: S_local x S_block bools, never S_local x S
        q_pos = spec.key_positions(spec.group.rank, call.device)[plan.rows]
        key_pos = spec.key_positions(src, call.device)[plan.cols]
        mask = materialize_mask_mod(mask, call.batch, call.q_heads, q_pos, key_pos)
    elif mask is not None:
        key_pos = spec.key_positions(src, mask.device)[plan.cols]
        mask = select_queries(select_keys(mask, key_pos), plan.rows)
    full_cols = plan.cols.stop - plan.cols.start == k.shape[2]
    return as_kernel_call(provider, call.replace(
        query=rows.get("query", plan.rows),
        key=k if full_cols else k[:, :, plan.cols],
        value=v if full_cols else v[:, :, plan.cols],
        attn_mask=mask,
        is_causal=plan.causal,
        sinks=None,  # added once, to the merged result (RingAttention)
    ))


class _KVBuffers:
    """`count` flat receive buffers (two by default), used in turn, viewed at each incoming block's length.

    A buffer is reused `count` exchanges later, when the exchange that last used it has been waited for (a
    wait covers its sends as well as its receives) and, where steps run on several streams, the kernel that
    read it last has been waited for (see ring_backward). Each is allocated at its first use: two ranks
    exchange once per pass and never need the second."""

    def __init__(self, like_k: torch.Tensor, like_v: torch.Tensor, max_len: int, count: int = 2):
        b, h, _, d = like_k.shape
        dv = like_v.shape[-1]
        self._shape = (b, h, d, dv)
        self._max_len = max_len
        self._opts = {"dtype": like_k.dtype, "device": like_k.device}
        self._bufs: list = [None] * count
        self._turn = 0

    def next(self, length: int) -> list[torch.Tensor]:
        b, h, d, dv = self._shape
        if self._bufs[self._turn] is None:
            numel = b * h * self._max_len
            self._bufs[self._turn] = (torch.empty(numel * d, **self._opts), torch.empty(numel * dv, **self._opts))
        kbuf, vbuf = self._bufs[self._turn]
        self._turn = (self._turn + 1) % len(self._bufs)
        return [kbuf[: b * h * length * d].view(b, h, length, d), vbuf[: b * h * length * dv].view(b, h, length, dv)]


def ring_forward(provider: Provider, call: AttentionCall, spec: RingSpec,
                 out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (out in `out_dtype`, lse float32) of attention over the whole ring's keys. The blocks' results
    merge in float32, in one pass at the end that writes `out_dtype` (see PartialAttention)."""
    out, lse, _ = ring_forward_keeping_last(provider, call, spec, out_dtype)
    return out, lse


def ring_forward_keeping_last(provider: Provider, call: AttentionCall, spec: RingSpec,
                              out_dtype: torch.dtype = torch.float32):
    """`ring_forward`, and the last KV block it received (source rank + 1; None on one rank), which
    `ring_backward` starts from."""
    group, world = spec.group, spec.group.size
    channel = spec.channel()
    k, v = call.key.contiguous(), call.value.contiguous()
    buffers = _KVBuffers(k, v, spec.max_length)
    rows = stationary_rows(provider, call, query=call.query)
    acc = PartialAttention(call.batch, call.q_heads, call.q_len, call.value_dim, call.device)
    for step in range(world):
        src = (group.rank - step) % world
        pending = None
        if step < world - 1:  # start the next block's transfer before computing on this one
            pending = channel.exchange([k, v], buffers.next(spec.length((src - 1) % world)), "kv")
        plan = block_plan(spec, group.rank, src, call.is_causal, call.q_len)
        if plan is not None:
            out_b, lse_b = provider.forward(_block_call(provider, call, spec, src, k, v, plan, rows))
            acc.add_rows(plan.rows, out_b, lse_b)
        if pending is not None:
            k, v = pending.wait()
    out, lse = acc.result(out_dtype)
    return out, lse, ((k, v) if world > 1 else None)


def ring_backward(
    provider: Provider, call: AttentionCall, spec: RingSpec, dout: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, dq_dtype: torch.dtype = torch.float32, last_block: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq in `dq_dtype`, dk, dv in the inputs' dtype) of this rank's shard (see the module docstring).
    `last_block`: the forward's last KV block (`ring_forward_keeping_last`); without it, it is fetched first."""
    group, me, world = spec.group, spec.group.rank, spec.group.size
    channel = spec.channel()
    own_k, own_v = call.key.contiguous(), call.value.contiguous()
    work = call.batch * call.q_heads * call.q_len * call.kv_len
    steps = StepStreams(call.device, stream_count(call.device, spec.step_streams, work))
    # one buffer more than streams: the one a receive refills was last read on the stream its step is about to use
    buffers = _KVBuffers(own_k, own_v, spec.max_length, steps.count + 1)
    rows = stationary_rows(provider, call, query=call.query, dout=dout, out=out, lse=lse)
    replicated = call.q_len - spec.length(me)  # query rows beyond the shard (a prefix): the same on every rank
    query_grads = provider.shared_rows_backward(call, dout, out, lse)  # dQ summed over the steps, asked for at the end
    own_grads = _OwnBlockGrads(own_k, own_v, call.device)
    sources = [(me + 1 + step) % world for step in range(world)]  # the forward's order reversed: mine last
    k, v = own_k, own_v
    if world > 1:
        k, v = last_block if last_block is not None else channel.send_recv(
            [own_k, own_v], group.prev, buffers.next(spec.length(sources[0])), group.next, "kv").wait()
    try:
        for step, src in enumerate(sources):
            pending_kv = None
            if step < world - 2:  # pass this block on backwards round the ring; the last step's block is mine
                steps.main_waits_for(step)  # the kernel that read the buffer this receive refills
                pending_kv = channel.send_recv([k, v], group.prev, buffers.next(spec.length(sources[step + 1])),
                                               group.next, "kv")
            plan = block_plan(spec, me, src, call.is_causal, call.q_len)
            if plan is not None:  # the step's inputs are made on the main stream: later steps may share them
                block = _block_call(provider, call, spec, src, k, v, plan, rows)
                row_args = (rows.get("dout", plan.rows), rows.get("out", plan.rows), rows.get("lse", plan.rows))
            if src != me:
                sender = (me - 1 - step) % world  # computes on my block at this step
                sender_plan = block_plan(spec, sender, me, call.is_causal, spec.length(sender) + replicated)
                receive = own_grads.part_buffers(sender_plan)
            with steps.on(step):
                grads = None if plan is None else query_grads.block(block, plan.rows, *row_args)  # (dK, dV) part
                if src == me:
                    if grads is not None:
                        own_grads.add(plan.cols, grads)
                else:  # sent from the step's stream, so the transfer waits for its kernel
                    send = [] if grads is None else [grads[0].contiguous(), grads[1].contiguous()]
                    exchange = channel.send_recv(send, src, receive, sender, "dkv")
            if src != me:
                own_grads.expect(exchange, sender_plan)
            if pending_kv is not None:
                k, v = pending_kv.wait()
            elif step == world - 2:
                k, v = own_k, own_v
        own_grads.collect()
    finally:
        steps.join()
    return query_grads.dq(dq_dtype), own_grads.dk.result(call.dtype), own_grads.dv.result(call.dtype)


class _OwnBlockGrads:
    """dK and dV of this rank's own KV block: the part its own step computes, and the parts the other ranks send
    as they compute on the block. One step's incoming parts are collected at the next step, so their transfer
    overlaps that step's kernel."""

    def __init__(self, own_k: torch.Tensor, own_v: torch.Tensor, device: torch.device):
        self._like = own_k, own_v
        self.dk, self.dv = gradsum.DeferredRowSum(own_k.shape, device), gradsum.DeferredRowSum(own_v.shape, device)
        self._in_flight = None  # (exchange, the sender's plan) of the previous step's incoming parts

    def add(self, cols: slice, parts) -> None:
        self.dk.add(cols, parts[0])
        self.dv.add(cols, parts[1])

    def part_buffers(self, sender_plan: BlockPlan | None) -> list[torch.Tensor]:
        """Receive buffers for the parts a sender computes with `sender_plan` (none where its plan is empty)."""
        if sender_plan is None:
            return []
        return [x.new_empty(x.shape[:2] + (sender_plan.cols.stop - sender_plan.cols.start,) + x.shape[3:])
                for x in self._like]

    def expect(self, exchange, sender_plan: BlockPlan | None) -> None:
        """Collect the previous step's incoming parts, then keep this step's exchange until the next."""
        self.collect()
        self._in_flight = (exchange, sender_plan)

    def collect(self) -> None:
        """Wait for the incoming parts in flight and add them (a sender with an empty plan sends none)."""
        if self._in_flight is None:
            return
        exchange, sender_plan = self._in_flight
        self._in_flight = None
        parts = exchange.wait()
        if sender_plan is not None:
            self.add(sender_plan.cols, parts)


def ring_call(call: AttentionCall, total: int) -> AttentionCall:
    """`call` as a ring of `total` tokens runs it: a window that restricts nothing for that length (or nothing
    beyond causality) dropped, so the rotating ring takes it (see halo.restricting_band)."""
    if call.window is not None and restricting_band(call, total) is None:
        return call.replace(window=None)
    return call


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the sinks join a merged result: float64 for float64 inputs, else float32 (as ops/sinks.py)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None, dtype: torch.dtype):
    """(out in `dtype`, lse): the sinks joined to the merged result once, as one more log-sum-exp term; the lse
    returned then includes them (T), which is what the backward takes."""
    if sinks is None:
        return out.to(dtype), lse
    out, total = add_sinks(out.to(_sum_dtype(dtype)), lse, sinks)
    return out.to(dtype), total


def _ring_forward(provider: Provider, call: AttentionCall, spec: RingSpec, dtype: torch.dtype,
                  sinks: torch.Tensor | None):
    """(out in `dtype`, lse with the sinks, what the backward needs kept): the rotating ring, or the windowed
    exchange (halo.py) for a call whose window restricts the keys; the sinks join once, after the merge."""
    band_ = restricting_band(call, spec.total)
    merged = dtype if sinks is None else _sum_dtype(dtype)
    if band_ is None:
        out, lse, last = ring_forward_keeping_last(provider, call, spec, merged)
        kept = last or ()
    else:
        out, lse, kept = halo_forward(provider, call, spec, band_, merged)
    return (*_with_sinks(out, lse, sinks, dtype), kept)


def _ring_backward(provider: Provider, call: AttentionCall, spec: RingSpec, dout, out, lse, dtype, kept):
    band_ = restricting_band(call, spec.total)
    if band_ is None:
        return ring_backward(provider, call, spec, dout, out, lse, dtype, tuple(kept) or None)
    return halo_backward(provider, call, spec, band_, dout, out, lse, dtype, tuple(kept))


def _needs_grad(sinks: torch.Tensor | None) -> bool:
    return sinks is not None and sinks.requires_grad and torch.is_grad_enabled()


class RingAttention(torch.autograd.Function):
    """Autograd wrapper: forward merges blocks (keeping its last one, or its halos) and joins the sinks once;
    backward runs the steps in reverse with the lse that includes the sinks and the final out (so the q, k, v
    gradients are those of the softmax with sinks) and takes this rank's rows' share of the sinks' gradient.
    The sinks are a replicated parameter: the usual gradient all-reduce over the group adds the ranks' shares,
    which is the whole gradient since every row lives on exactly one rank."""

    @staticmethod
    def forward(ctx, query, key, value, sinks, provider, call, spec):
        call = call.replace(query=query, key=key, value=value)
        out, lse, kept = _ring_forward(provider, call, spec, query.dtype, sinks)
        ctx.provider, ctx.call, ctx.spec = provider, call, spec
        ctx.save_for_backward(query, key, value, out, lse, sinks, *kept)
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, out, lse, sinks, *kept = ctx.saved_tensors
        call = ctx.call.replace(query=query, key=key, value=value)
        dout = dout.contiguous()
        dq = dk = dv = dsinks = None
        with autocast_off(query.device):
            if any(ctx.needs_input_grad[:3]):
                dq, dk, dv = _ring_backward(ctx.provider, call, ctx.spec, dout, out, lse, query.dtype, kept)
                dk, dv = dk.to(key.dtype), dv.to(value.dtype)
            if ctx.needs_input_grad[3]:
                dsinks = sink_grad(dout, out, lse, sinks)
        return dq, dk, dv, dsinks, None, None, None


def ring_attention(provider: Provider, call: AttentionCall, spec: RingSpec) -> torch.Tensor:
    """Ring attention of this rank's queries over the whole ring's keys, with the call's window (halo.py where it
    restricts the keys), softcap (every block) and sinks (once, after the merge)."""
    call = ring_call(call, spec.total)
    sinks, call = call.sinks, call.replace(sinks=None)
    if call.needs_grad or _needs_grad(sinks):
        return RingAttention.apply(call.query, call.key, call.value, sinks, provider, call, spec)
    with torch.no_grad():
        return _ring_forward(provider, call, spec, call.dtype, sinks)[0]


def _prefix_ring_forward(provider: Provider, call: AttentionCall, spec: RingSpec, prefix: int, suffix: int,
                         sinks: torch.Tensor | None = None):
    """All local query rows against the local replicated KV block (prefix and suffix), merged with the ring over
    the sharded KV; the sinks join the merged result once."""
    k_pre, v_pre, k_shard, v_shard = split_replicated(call, prefix, suffix)
    out_p, lse_p = provider.forward(as_kernel_call(provider, call.replace(key=k_pre, value=v_pre)))
    out_r, lse_r, last = ring_forward_keeping_last(provider, call.replace(key=k_shard, value=v_shard), spec)
    out, lse = merge_two(out_p, lse_p, out_r, lse_r)
    out, lse = _with_sinks(out, lse, sinks, call.dtype)
    return out, lse, last


class PrefixRingAttention(torch.autograd.Function):
    """Autograd over `_prefix_ring_forward`; backward splits into the prefix block and the ring (with the lse that
    includes the sinks), and this rank's rows' share of the sinks' gradient (as RingAttention)."""

    @staticmethod
    def forward(ctx, query, key, value, sinks, provider, call, spec, prefix, suffix):
        call = call.replace(query=query, key=key, value=value)
        out, lse, last = _prefix_ring_forward(provider, call, spec, prefix, suffix, sinks)
        ctx.provider, ctx.spec, ctx.prefix, ctx.suffix, ctx.call = provider, spec, prefix, suffix, call
        ctx.save_for_backward(query, key, value, out, lse, sinks, *(last or ()))
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, out, lse, sinks, *last = ctx.saved_tensors
        call = ctx.call.replace(query=query, key=key, value=value)
        k_pre, v_pre, k_shard, v_shard = split_replicated(call, ctx.prefix, ctx.suffix)
        dout = dout.contiguous()
        dq = dk = dv = dsinks = None
        with autocast_off(query.device):
            if any(ctx.needs_input_grad[:3]):
                prefix_call = as_kernel_call(ctx.provider, call.replace(key=k_pre, value=v_pre))
                dq_p, dk_p, dv_p = ctx.provider.backward(prefix_call, dout, out, lse)
                dq_r, dk_r, dv_r = ring_backward(ctx.provider, call.replace(key=k_shard, value=v_shard), ctx.spec,
                                                 dout, out, lse, last_block=tuple(last) or None)
                dq = (dq_r + dq_p.float()).to(query.dtype)
                dk = join_replicated(dk_p.float(), dk_r, ctx.prefix).to(key.dtype)
                dv = join_replicated(dv_p.float(), dv_r, ctx.prefix).to(value.dtype)
            if ctx.needs_input_grad[3]:
                dsinks = sink_grad(dout, out, lse, sinks)
        return dq, dk, dv, dsinks, None, None, None, None, None


def prefix_ring_attention(provider: Provider, call: AttentionCall, spec: RingSpec, prefix: int,
                          suffix: int = 0) -> torch.Tensor:
    """Ring attention of every local query row (prefix rows, the shard's, suffix rows) over the replicated block
    and the sharded KV."""
    sinks, call = call.sinks, call.replace(sinks=None)
    if call.needs_grad or _needs_grad(sinks):
        return PrefixRingAttention.apply(call.query, call.key, call.value, sinks, provider, call, spec, prefix,
                                         suffix)
    with torch.no_grad():
        return _prefix_ring_forward(provider, call, spec, prefix, suffix, sinks)[0]


# -- the schedule ---------------------------------------------------------------------------------------------

NEEDS_LSE_AND_BACKWARD = "a provider that returns a log-sum-exp and has a backward"


def ring_spec(cp: Setup, total: int) -> RingSpec:
    """The ring over the 1-D group (or a 2-D mesh's ring dimension) of `cp` for `total` tokens."""
    return RingSpec(cp.topology.ring, cp.layout, total, cp.data_timeout, cp.stats, step_streams=cp.ring_streams)


def ring_reasons(provider: Provider, call: AttentionCall) -> list[str]:
    """Why a ring (alone or inside the hybrid) cannot run `call` with `provider`."""
    out = provider.reasons(call, need_lse=True, need_backward=True)
    if call.dropout_p > 0:
        out.append("dropout under ring attention is not supported (each block would need its own "
                   "reproducible RNG stream)")
    return out


def ring_example(provider: Provider, call: AttentionCall, suggest: Suggest | None) -> str | None:
    """A provider, other than `provider`, that could ring `call`."""
    return suggest(call, provider.name, need_lse=True, need_backward=True) if suggest else None


class RingSchedule:
    name = "ring"
    mesh_dims = 1
    takes_prefix = True
    auto_order = 30  # asked last on a 1-D mesh: takes every call the others leave
    mask_mod_per_block = True  # each KV block's (local rows x block keys) only, never the whole row

    def auto(self, cp: Setup, provider: Provider, call: AttentionCall) -> str | None:
        if cp.replicated:
            return "a replicated prefix or suffix runs on ring (their KV as a local block)"
        return "ring overlaps its transfers with compute"

    def reasons(self, cp: Setup, provider: Provider, call: AttentionCall) -> list[str]:
        return ring_reasons(provider, call)

    def kernel_shapes(self, cp: Setup, call: AttentionCall, total: int, lengths: list[int]) -> set[KernelShape]:
        if call.window is not None:  # blocks cut to their own windows by trim_block: left to the shard check
            return set()
        if call.is_causal:  # its causal blocks are left to the shard check
            return set()
        replicated = cp.replicated
        blocks = lengths + ([replicated] if replicated else [])
        return {(n + replicated, m, False) for n in lengths for m in blocks}

    def suggestion(self, provider: Provider, call: AttentionCall, suggest: Suggest | None) -> str:
        return with_example(f"cp_strategy='ulysses' or 'allgather', or {NEEDS_LSE_AND_BACKWARD}",
                            ring_example(provider, call, suggest))

    def run(self, cp: Setup, provider: Provider, call: AttentionCall, agreed: Agreed) -> torch.Tensor:
        spec = ring_spec(cp, agreed.total)
        if cp.replicated:
            return prefix_ring_attention(provider, call, spec, cp.prefix, cp.suffix)
        return ring_attention(provider, call, spec)


RING = RingSchedule()
