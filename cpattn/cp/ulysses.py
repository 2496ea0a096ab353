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
This module never names a provider.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..contract import AttentionCall, expand_kv
from .comm import AllToAll, CommStats, all_gather_padded
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


def seq_to_heads(x: torch.Tensor, head_splits: list[int], spec: UlyssesSpec) -> torch.Tensor:
    """(B, H, S_local, D) on every rank -> (B, H_mine, S_group, D)."""
    me = spec.group.rank
    b, _, s_local, d = x.shape
    parts = torch.split(x, head_splits, dim=1)
    send = torch.cat([p.reshape(-1) for p in parts])
    in_numel = [b * h * s_local * d for h in head_splits]
    out_numel = [b * head_splits[me] * n * d for n in spec.lengths]
    recv = AllToAll.apply(send, out_numel, in_numel, spec.group, spec.timeout, spec.stats)
    chunks = torch.split(recv, out_numel)
    return torch.cat([c.view(b, head_splits[me], n, d) for c, n in zip(chunks, spec.lengths)], dim=2)


def heads_to_seq(x: torch.Tensor, head_splits: list[int], spec: UlyssesSpec) -> torch.Tensor:
    """Inverse of `seq_to_heads`: (B, H_mine, S_group, D) -> (B, H, S_local, D)."""
    me = spec.group.rank
    b, h_mine, _, d = x.shape
    parts = torch.split(x, spec.lengths, dim=2)
    send = torch.cat([p.reshape(-1) for p in parts])
    in_numel = [b * h_mine * n * d for n in spec.lengths]
    s_local = spec.lengths[me]
    out_numel = [b * h * s_local * d for h in head_splits]
    recv = AllToAll.apply(send, out_numel, in_numel, spec.group, spec.timeout, spec.stats)
    chunks = torch.split(recv, out_numel)
    return torch.cat([c.view(b, h, s_local, d) for c, h in zip(chunks, head_splits)], dim=1)


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
    """All-to-all to head shards, `inner` attention on whole sequences, all-to-all back."""
    world = spec.group.size
    q_splits = even_sizes(call.q_heads, world)
    key, value = call.key, call.value
    compressed = call.q_heads % world == 0 and call.kv_heads % world == 0
    if compressed:
        kv_splits = even_sizes(call.kv_heads, world)
    else:  # repeat KV heads so every rank's query heads find their KV heads locally
        key, value, kv_splits = expand_kv(key, call.groups), expand_kv(value, call.groups), q_splits
    q = seq_to_heads(call.query, q_splits, spec)
    k = seq_to_heads(key, kv_splits, spec)
    v = seq_to_heads(value, kv_splits, spec)
    if spec.order is not None:
        q, k, v = (t.index_select(2, spec.order.to(t.device)) for t in (q, k, v))
    mask = gather_mask_rows(call.attn_mask, q_splits, spec)
    out = inner(call.replace(query=q, key=k, value=v, attn_mask=mask))
    if spec.order is not None:
        out = out.index_select(2, spec.positions.to(out.device))
    return heads_to_seq(out, q_splits, spec)
