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

Overlap (calls without gradients, see `head_chunks_for`): with `head_chunks` > 1 each rank's heads are cut
into that many chunks, every chunk's q/k/v transfers are started first, and the chunks then run in turn: a
chunk's attention overlaps the next chunk's incoming transfers and the previous chunk's outgoing one, so only
the first chunk's inputs and the last chunk's output wait in the open. (A transfer started after a kernel was
queued would wait for that kernel: NCCL orders its stream after the caller's when a collective starts, which is
why every input transfer starts up front.)
This module never names a provider.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..contract import AttentionCall, expand_kv
from .comm import AllToAllStart, AllToAllWait, CommStats, InFlight, all_gather_padded
from .layout import even_sizes
from .mesh import Group


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


# Chunks no smaller than this per rank and tensor: on two H200s an all-to-all of a 64 MiB buffer ran at 149 GB/s
# and of a 256 MiB one at 234 GB/s (benchmarks/results/multigpu_h200x2), so cutting smaller costs more transfer
# time than the overlap hides.
MIN_CHUNK_BYTES = 64 * 2**20
MAX_HEAD_CHUNKS = 4


def head_chunks_for(call: AttentionCall, total: int, world: int) -> int:
    """How many head chunks to pipeline: the most (up to MAX_HEAD_CHUNKS) whose query transfer per rank stays
    at least MIN_CHUNK_BYTES, and one for calls that need gradients. From quantities every rank agrees on, so
    every rank picks the same.

    Why not with gradients: autograd runs each chunk's backward all-to-all right after the chunk's backward
    kernel is queued, so NCCL orders it behind that kernel and nothing overlaps, while the smaller kernels cost a
    little (one H200, benchmarks/ulysses_chunk_probe.py: forward+backward in 2 or 4 calls took 0.98-1.01 of one
    call at 128k and down to 0.93 at 32k). The forward alone in chunks took 0.98-1.08 of one call at 128k."""
    if call.needs_grad:
        return 1
    per_rank = call.batch * call.q_heads * (total // world) * call.head_dim * call.query.element_size()
    chunks = MAX_HEAD_CHUNKS
    while chunks > 1 and per_rank // chunks < MIN_CHUNK_BYTES:
        chunks //= 2
    return chunks


def _pack(parts: list[torch.Tensor]) -> torch.Tensor:
    """The parts' elements one after another in a flat buffer: one copy of each (reshape then cat copied
    strided parts twice)."""
    flat = parts[0].new_empty(sum(p.numel() for p in parts))
    offset = 0
    for p in parts:
        flat[offset:offset + p.numel()].view(p.shape).copy_(p)
        offset += p.numel()
    return flat


def _count(heads: slice) -> int:
    return heads.stop - heads.start


def _start(send: torch.Tensor, out_numel: list[int], in_numel: list[int], spec: UlyssesSpec):
    """Start an all-to-all of `send`; returns the function that waits for it and gives the received buffer."""
    flight = InFlight()
    received = AllToAllStart.apply(send, out_numel, in_numel, spec.group, spec.timeout, spec.stats, flight)
    return lambda: AllToAllWait.apply(received, flight, spec.group, spec.timeout)


def start_seq_to_heads(x: torch.Tensor, heads: list[slice], spec: UlyssesSpec):
    """Start turning (B, H, S_local, D) on every rank into (B, heads[me], S_group, D), where `heads[r]` are
    the heads rank r receives; returns the function that waits and assembles."""
    me = spec.group.rank
    b, _, s_local, d = x.shape
    mine = _count(heads[me])
    in_numel = [b * _count(h) * s_local * d for h in heads]
    out_numel = [b * mine * n * d for n in spec.lengths]
    received = _start(_pack([x[:, h] for h in heads]), out_numel, in_numel, spec)

    def finish() -> torch.Tensor:
        parts = torch.split(received(), out_numel)
        return torch.cat([p.view(b, mine, n, d) for p, n in zip(parts, spec.lengths)], dim=2)
    return finish


def start_heads_to_seq(x: torch.Tensor, heads: list[slice], spec: UlyssesSpec):
    """Inverse of `start_seq_to_heads`: (B, heads[me], S_group, D) -> for every rank r, the (B, heads[r],
    S_local, D) part of this rank's sequence; returns the function that waits and gives that list."""
    me = spec.group.rank
    b, mine, _, d = x.shape
    s_local = spec.lengths[me]
    in_numel = [b * mine * n * d for n in spec.lengths]
    out_numel = [b * _count(h) * s_local * d for h in heads]
    received = _start(_pack(list(torch.split(x, spec.lengths, dim=2))), out_numel, in_numel, spec)

    def finish() -> list[torch.Tensor]:
        parts = torch.split(received(), out_numel)
        return [p.view(b, _count(h), s_local, d) for p, h in zip(parts, heads)]
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
    started = [[start_seq_to_heads(t, heads, spec) for t, heads in ((call.query, qh), (key, kh), (value, kh))]
               for qh, kh in zip(q_heads, kv_heads)]
    mask = gather_mask_rows(call.attn_mask, q_splits, spec)
    returning = []
    for inputs, qh in zip(started, q_heads):
        q, k, v = (finish() for finish in inputs)
        if spec.order is not None:
            q, k, v = (t.index_select(2, spec.order.to(t.device)) for t in (q, k, v))
        out = inner(call.replace(query=q, key=k, value=v, attn_mask=mask))
        if spec.order is not None:
            out = out.index_select(2, spec.positions.to(out.device))
        returning.append(start_heads_to_seq(out, qh, spec))
    parts = [finish() for finish in returning]  # [chunk][rank]: heads in global order are rank-major
    return torch.cat([parts[c][r] for r in range(world) for c in range(chunks)], dim=1)
