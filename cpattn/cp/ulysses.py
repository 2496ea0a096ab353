"""Ulysses: trade the sequence shard for a head shard, attend over the whole sequence, trade back.

Before attention one all-to-all per tensor turns (B, H, S/P, D) on each rank into (B, H/P, S, D): rank j
receives heads j's share from every rank and concatenates their sequence parts in rank order. Any kernel
then runs unchanged on whole sequences (dropout and masks included). After attention the inverse
all-to-all returns each rank's sequence part with all heads.

Uneven cases: heads are split as evenly as possible (counts differ by one when P does not divide H);
sequence parts may differ in length. With GQA the KV heads are sent compressed when both head counts
divide evenly; otherwise KV heads are repeated up to the query heads first (gradients sum back).

The concatenated sequence is in the order of the ranks' layout positions; `order` (when given) permutes
it into global order so causal masks and user masks apply by position, and back afterwards.

Score modifications: the inner call is the whole sequence in global order, so a window and a softcap apply to it
as on one device (scoremods.attention: natively, or a window as the exact mask). Each rank holds a slice of the
heads, so it takes the sinks of those heads only: their gradient is complete for its heads and zero for the
others, and the gradient all-reduce of the replicated sinks adds the ranks' slices into the whole.

Overlap (calls without gradients, see `head_chunks_for`): with `head_chunks` > 1 each rank's heads are cut
into that many chunks, every chunk's q/k/v transfers are started first, and the chunks then run in turn: a
chunk's attention overlaps the next chunk's incoming transfers and the previous chunk's outgoing one, so only
the first chunk's inputs and the last chunk's output wait in the open. (A transfer started after a kernel was
queued would wait for that kernel: NCCL orders its stream after the caller's when a collective starts, which is
why every input transfer starts up front.)

`ULYSSES` is the schedule on a 1-D mesh (around the provider's own attention); the hybrid (hybrid.py) runs it
across a 2-D mesh's Ulysses dimension around a ring. This module never names a provider.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from ..contract import AttentionCall, Provider, expand_kv
from ..scoremods import attention
from .comm import AllToAllStart, AllToAllWait, CommStats, InFlight, all_gather_padded
from .kernel_checks import reasons_for_any_total
from .layout import even_sizes, gathered_order, local_len
from .mesh import Group
from .schedule import Agreed, KernelShape, Setup, Suggest, with_example


@dataclass
class UlyssesSpec:
    group: Group
    lengths: list[int]  # local sequence length of every rank of the group
    timeout: float | None  # None: see comm._wait
    stats: CommStats
    order: torch.Tensor | None = None  # gathered index -> global order (None: already in order)
    positions: torch.Tensor | None = None  # global position of each gathered index (inverse of order)
    # attn_mask has a row per query (gather rows) rather than one row for all; decided by every rank together,
    # since a rank holding a single query cannot tell from its own mask (None: from the local shape)
    mask_per_query: bool | None = None
    head_chunks: int = 1  # pipelined chunks of each rank's heads (module docstring); the same on every rank


# Chunks no smaller than this per rank and tensor: an all-to-all's bandwidth falls with its buffer's size, so
# smaller chunks cost more transfer time than the overlap hides.
MIN_CHUNK_BYTES = 64 * 2**20
MAX_HEAD_CHUNKS = 4


def head_chunks_for(call: AttentionCall, total: int, world: int) -> int:
    """How many head chunks to pipeline: the most (up to MAX_HEAD_CHUNKS) whose query transfer per rank stays
    at least MIN_CHUNK_BYTES, and one for calls that need gradients. From quantities every rank agrees on, so
    every rank picks the same.

    Why not with gradients: autograd runs each chunk's backward all-to-all right after the chunk's backward
    kernel is queued, so NCCL orders it behind that kernel and nothing overlaps, while the smaller kernels are
    each a little less efficient than one whole call."""
    if call.needs_grad:
        return 1
    per_rank = call.batch * call.q_heads * (total // world) * call.head_dim * call.query.element_size()
    chunks = MAX_HEAD_CHUNKS
    while chunks > 1 and per_rank // chunks < MIN_CHUNK_BYTES:
        chunks //= 2
    return chunks


def _flat_concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts' elements one after another in a flat buffer: one copy of each (reshape then cat copied
    strided parts twice)."""
    flat = parts[0].new_empty(sum(p.numel() for p in parts))
    offset = 0
    for p in parts:
        flat[offset:offset + p.numel()].view(p.shape).copy_(p)
        offset += p.numel()
    return flat


def _head_count(heads: slice) -> int:
    return heads.stop - heads.start


def _start_all_to_all(send: torch.Tensor, out_numel: list[int], in_numel: list[int], spec: UlyssesSpec):
    """Start an all-to-all of `send`; returns the function that waits for it and gives the received buffer."""
    flight = InFlight()
    received = AllToAllStart.apply(send, out_numel, in_numel, spec.group, spec.timeout, spec.stats, flight)
    return lambda: AllToAllWait.apply(received, flight, spec.group, spec.timeout)


def start_seq_to_heads(x: torch.Tensor, heads: list[slice], spec: UlyssesSpec):
    """Start turning (B, H, S_local, D) on every rank into (B, heads[me], S_group, D), where `heads[r]` are
    the heads rank r receives; returns the function that waits and assembles."""
    me = spec.group.rank
    b, _, s_local, d = x.shape
    my_heads = _head_count(heads[me])
    in_numel = [b * _head_count(h) * s_local * d for h in heads]
    out_numel = [b * my_heads * n * d for n in spec.lengths]
    received = _start_all_to_all(_flat_concat([x[:, h] for h in heads]), out_numel, in_numel, spec)

    def finish() -> torch.Tensor:
        parts = torch.split(received(), out_numel)
        return torch.cat([p.view(b, my_heads, n, d) for p, n in zip(parts, spec.lengths)], dim=2)
    return finish


def start_heads_to_seq(x: torch.Tensor, heads: list[slice], spec: UlyssesSpec):
    """Inverse of `start_seq_to_heads`: (B, heads[me], S_group, D) -> for every rank r, the (B, heads[r],
    S_local, D) part of this rank's sequence; returns the function that waits and gives that list."""
    me = spec.group.rank
    b, my_heads, _, d = x.shape
    s_local = spec.lengths[me]
    in_numel = [b * my_heads * n * d for n in spec.lengths]
    out_numel = [b * _head_count(h) * s_local * d for h in heads]
    received = _start_all_to_all(_flat_concat(list(torch.split(x, spec.lengths, dim=2))), out_numel, in_numel, spec)

    def finish() -> list[torch.Tensor]:
        parts = torch.split(received(), out_numel)
        return [p.view(b, _head_count(h), s_local, d) for p, h in zip(parts, heads)]
    return finish


def _chunk_heads(splits: list[int], chunks: int) -> list[list[slice]]:
    """[chunk][rank]: the global heads rank r receives in that chunk (rank r's heads in `chunks` equal runs)."""
    starts = [sum(splits[:r]) for r in range(len(splits))]
    return [[slice(s + c * n // chunks, s + (c + 1) * n // chunks) for s, n in zip(starts, splits)]
            for c in range(chunks)]


def _head_range(splits: list[int], rank: int) -> slice:
    start = sum(splits[:rank])
    return slice(start, start + splits[rank])


def gather_mask_rows(mask: torch.Tensor | None, q_splits: list[int], spec: UlyssesSpec) -> torch.Tensor | None:
    """A (rows = local queries, cols = all keys) mask -> rows of the whole group, heads of this rank."""
    if mask is None:
        return None
    per_query = spec.mask_per_query if spec.mask_per_query is not None else mask.dim() >= 2 and mask.shape[-2] > 1
    if mask.dim() >= 2 and per_query:
        # every rank contributes its rows for all heads; each then keeps its own heads (below)
        rows = all_gather_padded(mask, spec.lengths, mask.dim() - 2, spec.group, spec.timeout)
        mask = torch.cat(rows, dim=-2)
        if spec.order is not None:
            mask = mask.index_select(-2, spec.order.to(mask.device))
    if mask.dim() == 4 and mask.shape[1] > 1:
        mask = mask[:, _head_range(q_splits, spec.group.rank)]
    return mask


def ulysses_attention(
    call: AttentionCall, spec: UlyssesSpec, inner: Callable[[AttentionCall], torch.Tensor]
) -> torch.Tensor:
    """All-to-all to head shards, `inner` attention on whole sequences, all-to-all back (in head chunks that
    overlap each other's transfers, see the module docstring)."""
    world = spec.group.size
    q_splits = even_sizes(call.q_heads, world)
    key, value = call.key, call.value
    compressed = call.q_heads % world == 0 and call.kv_heads % world == 0
    if compressed:
        kv_splits = even_sizes(call.kv_heads, world)
    else:  # repeat KV heads so every rank's query heads find their KV heads locally
        key, value, kv_splits = expand_kv(key, call.groups), expand_kv(value, call.groups), q_splits
    # chunks cut every rank's heads evenly; a mask's rows and heads are gathered whole, so masked calls run whole
    chunks = 1 if call.attn_mask is not None else max(
        n for n in range(spec.head_chunks, 0, -1) if all(h % n == 0 for h in q_splits + kv_splits))
    q_heads, kv_heads = _chunk_heads(q_splits, chunks), _chunk_heads(kv_splits, chunks)
    inputs_in_flight = [[start_seq_to_heads(t, heads, spec)
                         for t, heads in ((call.query, qh), (key, kh), (value, kh))]
                        for qh, kh in zip(q_heads, kv_heads)]
    mask = gather_mask_rows(call.attn_mask, q_splits, spec)
    outputs_in_flight = []
    for inputs, qh in zip(inputs_in_flight, q_heads):
        q, k, v = (finish() for finish in inputs)
        if spec.order is not None:
            q, k, v = (t.index_select(2, spec.order.to(t.device)) for t in (q, k, v))
        sinks = None if call.sinks is None else call.sinks[qh[spec.group.rank]]  # this rank's heads' sinks
        out = inner(call.replace(query=q, key=k, value=v, attn_mask=mask, sinks=sinks))
        if spec.order is not None:
            out = out.index_select(2, spec.positions.to(out.device))
        outputs_in_flight.append(start_heads_to_seq(out, qh, spec))
    parts = [finish() for finish in outputs_in_flight]  # [chunk][rank]: heads in global order are rank-major
    return torch.cat([parts[c][r] for r in range(world) for c in range(chunks)], dim=1)


# -- the schedule ---------------------------------------------------------------------------------------------

def heads_reasons(call: AttentionCall, ranks: int) -> list[str]:
    """Ulysses over `ranks` ranks gives each rank at least one query head."""
    if call.q_heads < ranks:
        return [f"Ulysses over {ranks} ranks needs at least {ranks} query heads, got {call.q_heads}"]
    return []


def ulysses_spec(cp: Setup, call: AttentionCall, agreed: Agreed) -> UlyssesSpec:
    """Ulysses over the 1-D group of `cp`: the gathered sequence put in global order, heads in chunks."""
    group, total = cp.topology.ring, agreed.total
    lengths = [local_len(total, group.size, 1, r, 0, cp.layout) for r in range(group.size)]
    order, positions = gathered_order(total, group.size, cp.layout, call.device)
    return UlyssesSpec(group, lengths, cp.data_timeout, cp.stats, order, positions, agreed.mask_per_query,
                       cp.head_chunks(call, total))


class UlyssesSchedule:
    name = "ulysses"
    mesh_dims = 1
    takes_prefix = False
    auto_order = 20
    mask_mod_per_block = False

    def auto(self, cp: Setup, provider: Provider, call: AttentionCall) -> str | None:
        if cp.replicated:
            return None
        if call.dropout_p > 0:
            return "dropout needs whole-sequence kernel calls"
        w = cp.world_size
        if call.q_heads % w == 0 and call.kv_heads % w == 0:
            ratio = w * call.kv_heads / (call.q_heads + call.kv_heads)  # ring bytes / Ulysses bytes
            if ratio > 1:
                return f"heads divide by {w} and ring would move {ratio:.1f}x Ulysses' bytes"
        return None

    def reasons(self, cp: Setup, provider: Provider, call: AttentionCall) -> list[str]:
        return reasons_for_any_total(cp, self, provider, call) + heads_reasons(call, cp.world_size)

    def kernel_shapes(self, cp: Setup, call: AttentionCall, total: int, lengths: list[int]) -> set[KernelShape]:
        return {(total, total, call.is_causal)}

    def suggestion(self, provider: Provider, call: AttentionCall, suggest: Suggest | None) -> str:
        return with_example("cp_strategy='ring', or another provider",
                            suggest(call, provider.name) if suggest else None)

    def run(self, cp: Setup, provider: Provider, call: AttentionCall, agreed: Agreed) -> torch.Tensor:
        return ulysses_attention(call, ulysses_spec(cp, call, agreed), functools.partial(attention, provider))


ULYSSES = UlyssesSchedule()
