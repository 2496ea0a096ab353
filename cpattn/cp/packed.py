"""Packed (varlen) sequences under context parallelism: all-gather K/V, one varlen kernel call per run of queries.

Every rank holds a shard of one packed token stream (`shard_sequence(x, cp_mesh, 0, layout)` of (total, H, D)
tensors) and the stream's global document boundaries `bounds` (cu_seqlens, the same on every rank); documents may
cross shard boundaries. K and V are all-gathered into global order (backward: summed over ranks, this rank's part
kept, as in the all-gather schedule).

A rank's queries are runs of consecutive global positions: one under the contiguous layout, two under zigzag. For
a run [a, b), document [s, e) contributes query rows [max(s, a), min(e, b)) and keys [s, min(e, b)) with causal
attention or [s, e) without. The documents a run touches are adjacent, so their keys are one contiguous slice of
the gathered K/V, and the run's rows are a contiguous slice of the local queries: each run is one varlen call on
views, with no repacking. A query segment shorter than its key segment ends where its keys end, which is how
varlen kernels align causal attention (bottom-right), so no position offsets are needed.

A window (left, right) counts positions within each document (`run_calls`): a query at position p sees keys
p - left .. p + right. The kernels read window_size bottom-right per sequence: query row i of a sequence of
q rows against k keys is aligned with key i + k - q. A segment whose keys end `off` positions after its queries
end therefore takes window_size (left + off, right - off). Each segment's keys are cut to the band (at most
`right` keys past its last query), so off is 0 for every document the run holds to its end, and for every
document under causal attention; only a document cut by the run's end, without causal attention, has another
offset, and it gets a call of its own. A softcap goes to every call as it is. Sinks go to every call where the
kernel takes them natively (`GatheredKernel.takes_sinks`: FlashAttention-4's learnable_sink, with its
gradient): every local row is in exactly one call, so each row takes them once, and the gradient is this rank's
rows' share (the all-reduce of the replicated sinks adds the shares, as on the packed ring). A kernel without
them refuses sinks, naming the packed ring.

Shards made this way (by positions of the whole stream) run all-gather on a 1-D mesh (`packed_reasons`), entered
through ContextParallel.run_packed. Streams sharded by documents (cp/packed_layout.py) run the packed ring
(cp/packed_documents.py), or all-gather through `packed_attention` here with that layout's positions. This module
never names a provider: the caller passes the varlen kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..contract import AttentionCall, Provider
from ..errors import InvalidArgumentError, UnsupportedInputError
from ..ops.window import window_band
from .agreement import agree, agree_documents
from .allgather import AllGatherSpec, GatherSequence, allgather_spec
from .layout import local_positions
from .schedule import Setup

class GatheredKernel(Protocol):
    """All-gather's varlen call, given by the caller (which knows the provider)."""

    def takes_sinks(self) -> bool:
        """Whether the calls take the call's sinks natively, with their gradient."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                 window: "tuple[int | None, int | None] | None") -> torch.Tensor:
        """out of one varlen call on packed (tokens, H, D) views, with autograd: causal and `window`
        (bottom-right per sequence, sides >= 0 or None) as flash-attn aligns them, the call's softcap, and its
        sinks where `takes_sinks`."""


SCHEDULE = "allgather"  # the schedule packed streams run, as the agreement check compares it


def run_packed(cp: Setup, provider: Provider, call: AttentionCall, kernel: GatheredKernel,
               bounds: list[int], position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Check every rank agrees (the call, then the document boundaries), then `packed_attention`. Position ids,
    where given, must be the local tokens' positions within their documents in cp.layout's shards: a rank whose
    ids are not refuses the call, and so every rank raises."""
    reasons = provider.reasons(call) + packed_reasons(cp, cp.strategy) + gathered_mod_reasons(
        call, kernel, "shard the stream with cpattn.packed.shard_packed and pass sharding='documents' (the packed "
        "ring)") + _positions_reasons(cp, bounds, position_ids, call.q_len)
    total = agree(cp, provider, call, SCHEDULE, refused=bool(reasons)).total
    if reasons:
        raise UnsupportedInputError(f"packed sequences on provider '{provider.name}' under context "
                                    "parallelism", reasons)
    agree_documents(cp, bounds, call.device)
    check_bounds(bounds, total)
    cp.stats["calls"] += 1
    return packed_attention(kernel, call, bounds, allgather_spec(cp, total, call.device))


def _positions_reasons(cp: Setup, bounds: list[int], position_ids: torch.Tensor | None, q_len: int) -> list[str]:
    """Why `position_ids` cannot be this rank's tokens in cp.layout's shards of the stream `bounds` (none where
    the local length is not the layout's: the agreement says that)."""
    if position_ids is None:
        return []
    t = cp.topology
    rows = local_positions(bounds[-1], t.ring_size, t.ulysses_size, t.ring_rank, t.ulysses_rank, cp.layout)
    if rows.numel() != q_len:
        return []
    starts = torch.tensor(bounds[1:-1], dtype=torch.long)
    documents = torch.bucketize(rows, starts, right=True)
    expected = rows - torch.tensor(bounds[:-1], dtype=torch.long)[documents]
    if position_ids.numel() == q_len and torch.equal(position_ids.reshape(-1).long().cpu(), expected):
        return []
    return [f"position_ids are not this rank's tokens' positions within their documents in cp_layout="
            f"'{cp.layout}' shards of these cu_seqlens: the local tokens were sharded otherwise (another layout, "
            "or another order), and attention over them would be wrong even where their lengths match. Shard "
            f"with cpattn.shard_sequence(x, cp_mesh, 0, '{cp.layout}')"]


def packed_reasons(cp: Setup, strategy: str) -> list[str]:
    """Why packed sequences cannot run with `cp` under cp_strategy `strategy` (whatever the provider)."""
    out = []
    if cp.topology.mesh_dims != 1:
        out.append("packed sequences under context parallelism run all-gather on a 1-D cp_mesh; a 2-D mesh "
                   "runs the hybrid schedule, which has no packed form")
    if strategy not in ("auto", SCHEDULE):
        out.append(f"packed sequences sharded by position (cpattn.shard_sequence) run all-gather, not cp_strategy="
                   f"'{strategy}': pass cp_strategy='allgather' or 'auto'; for the packed ring shard them with "
                   "cpattn.packed.shard_packed and pass sharding='documents'; or use attention_dispatch with "
                   "cpattn.document_mask(...) for Ulysses")
    if cp.replicated:
        out.append("cp_replicated_prefix and cp_replicated_suffix have no packed form: put the shared tokens in a "
                   "document of their own")
    return out


def gathered_mod_reasons(call: AttentionCall, kernel: GatheredKernel, instead: str) -> list[str]:
    """Why all-gather's varlen calls cannot take the call's sinks (never dropped): where the kernel does not
    take them natively, the calls return no log-sum-exp to join them through. `instead`: what runs them (the
    packed ring)."""
    if call.sinks is not None and not kernel.takes_sinks():
        return ["sinks are not supported by all-gather over packed streams on this release of the varlen library "
                f"(its kernels take no sink logits, and the calls return no log-sum-exp to join them through); "
                f"{instead}, which joins them once per row"]
    return []


def check_bounds(bounds: list[int], total: int) -> None:
    """The document boundaries cover the whole packed stream the ranks hold together."""
    if bounds[-1] != total:
        raise InvalidArgumentError(
            f"cu_seqlens end at {bounds[-1]} tokens but the ranks hold {total} together: under context "
            "parallelism cu_seqlens are the boundaries of the whole packed stream, not of this rank's shard"
        )


def query_runs(positions: list[int]) -> list[tuple[int, int, int]]:
    """(local start, global start, global end) of each run of consecutive global positions, in local order."""
    runs = []
    for local, pos in enumerate(positions):
        if runs and pos == runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([local, pos, pos + 1])
    return [tuple(r) for r in runs]


@dataclass(frozen=True)
class RunCall:
    """One varlen call of a run of queries: global query positions [q0, q1), keys from global position k0,
    cu_seqlens of its rows and of its keys (both from 0), and the causal flag and bottom-right window it takes."""

    q0: int
    q1: int
    k0: int
    cu_q: tuple[int, ...]
    cu_k: tuple[int, ...]
    causal: bool
    window: "tuple[int | None, int | None] | None"


def run_calls(bounds: list[int], a: int, b: int, causal: bool,
              window: "tuple[int | None, int | None] | None" = None) -> list[RunCall]:
    """The varlen calls of the query run [a, b) over documents `bounds` (see the module docstring): one, or two
    where a window meets a document the run's end cuts without causal attention."""
    band = window_band(window, causal)
    calls: list[list] = []  # [segments (qa, qb, ka, kb), offset]
    for s, e in zip(bounds, bounds[1:]):
        if not (s < e and s < b and e > a):
            continue
        qa, qb = max(s, a), min(e, b)
        ka, kb = s, (qb if causal else e)
        if band is not None:
            left, right = band
            ka = ka if left is None else max(ka, qa - left)
            kb = kb if right is None else min(kb, qb + right)
        offset = kb - qb if band is not None else 0
        if calls and calls[-1][1] == offset:
            calls[-1][0].append((qa, qb, ka, kb))
        else:
            calls.append([[(qa, qb, ka, kb)], offset])
    return [_run_call(segments, band, offset, causal) for segments, offset in calls]


def _run_call(segments, band, offset: int, causal: bool) -> RunCall:
    cu_q, cu_k = [0], [0]
    for qa, qb, ka, kb in segments:
        cu_q.append(cu_q[-1] + qb - qa)
        cu_k.append(cu_k[-1] + kb - ka)
    window = None
    if band is not None:
        left, right = band
        window = (None if left is None else left + offset, None if right is None else right - offset)
        if window == (None, 0):  # the kernels' causal mask is this band
            causal, window = True, None
        elif window == (None, None):
            causal, window = False, None
        else:
            causal = False
    return RunCall(segments[0][0], segments[-1][1], segments[0][2], tuple(cu_q), tuple(cu_k), causal, window)


def _tokens_heads_dims(x: torch.Tensor) -> torch.Tensor:
    """(1, H, S, D) -> (S, H, D), contiguous as varlen kernels need."""
    return x.squeeze(0).transpose(0, 1).contiguous()


def packed_attention(kernel: GatheredKernel, call: AttentionCall, bounds: list[int],
                     spec: AllGatherSpec) -> torch.Tensor:
    """This rank's packed output (local tokens, Hq, Dv). `call` holds (1, H, S_local, D) views of the packed
    local q, k, v; every rank must call this (the K/V all-gather is a collective)."""
    keys = _tokens_heads_dims(GatherSequence.apply(call.key, spec))
    values = _tokens_heads_dims(GatherSequence.apply(call.value, spec))
    return gathered_runs(kernel, call, bounds, spec.q_positions.tolist(), keys, values)


def gathered_runs(kernel: GatheredKernel, call: AttentionCall, bounds: list[int], q_positions: list[int],
                  keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The varlen calls of each run of the local queries (global positions `q_positions`) against the gathered
    (S, Hkv, D) keys and values in global order (`run_calls`)."""
    q = call.query.squeeze(0).transpose(0, 1)  # the caller's packed (S_local, Hq, D) tensor again
    outs = []
    as_tensor = lambda cu: torch.tensor(cu, dtype=torch.int32, device=q.device)  # noqa: E731
    longest = lambda cu: max(y - x for x, y in zip(cu, cu[1:]))  # noqa: E731
    for local, a, b in query_runs(q_positions):
        for c in run_calls(bounds, a, b, call.is_causal, call.window):
            keys_end = c.k0 + c.cu_k[-1]
            outs.append(kernel(
                q[local + c.q0 - a:local + c.q1 - a], keys[c.k0:keys_end], values[c.k0:keys_end],
                as_tensor(c.cu_q), as_tensor(c.cu_k), longest(c.cu_q), longest(c.cu_k), c.causal, c.window,
            ))
    if not outs:  # this rank holds no token; its output still depends on the gathered K/V, so that its backward
        # takes part in their reduce-scatter like every other rank's (a rank that skipped it would stall the rest)
        empty = q.new_zeros(0, q.shape[1], call.value.shape[-1]) + (keys[:0].sum() + values[:0].sum())
        return empty if call.sinks is None else empty + call.sinks[:0].sum()  # and a (zero) sink gradient
    return torch.cat(outs, dim=0)
