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

The caller's varlen kernel carries the call's softcap to every call; windows and sinks are refused here, named
with the packed ring that takes them (`gathered_mod_reasons`).

Shards made this way (by positions of the whole stream) run all-gather on a 1-D mesh (`packed_reasons`), entered
through ContextParallel.run_packed. Streams sharded by documents (cp/packed_layout.py) run the packed ring
(cp/packed_documents.py), or all-gather through `packed_attention` here with that layout's positions. This module
never names a provider: the caller passes the varlen kernel.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..contract import AttentionCall, Provider
from ..errors import InvalidArgumentError, UnsupportedInputError
from .agreement import agree, agree_documents
from .allgather import AllGatherSpec, GatherSequence, allgather_spec
from .schedule import Setup

# kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> out, on packed (tokens, H, D) views
VarlenKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int],
                        torch.Tensor]


SCHEDULE = "allgather"  # the schedule packed streams run, as the agreement check compares it


def run_packed(cp: Setup, provider: Provider, call: AttentionCall, kernel: VarlenKernel,
               bounds: list[int]) -> torch.Tensor:
    """Check every rank agrees (the call, then the document boundaries), then `packed_attention`."""
    reasons = provider.reasons(call) + packed_reasons(cp, cp.strategy) + gathered_mod_reasons(
        call, "shard the stream with cpattn.packed.shard_packed and pass sharding='documents' (the packed ring)")
    total = agree(cp, provider, call, SCHEDULE, refused=bool(reasons)).total
    if reasons:
        raise UnsupportedInputError(f"packed sequences on provider '{provider.name}' under context "
                                    "parallelism", reasons)
    agree_documents(cp, bounds, call.device)
    check_bounds(bounds, total)
    cp.stats["calls"] += 1
    return packed_attention(kernel, call, bounds, allgather_spec(cp, total, call.device))


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


def gathered_mod_reasons(call: AttentionCall, instead: str) -> list[str]:
    """Why all-gather's varlen calls cannot take the call's window or sinks (never dropped): a call spans the
    documents a run of queries touches, each with its own offset between queries and keys, so one window_size
    does not fit them all; and the calls return no log-sum-exp to join sinks through. A softcap they take (it
    is the same for every score). `instead`: what runs them (the packed ring)."""
    out = []
    if call.window is not None:
        out.append(f"window={call.window} is not supported by all-gather over packed streams (its varlen calls "
                   f"span several documents with one window); {instead}, which applies it per document")
    if call.sinks is not None:
        out.append("sinks are not supported by all-gather over packed streams (its varlen calls return no "
                   f"log-sum-exp to join them through); {instead}, which joins them once per row")
    return out


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


def run_segments(bounds: list[int], a: int, b: int, causal: bool) -> tuple[list[int], list[int], int]:
    """For the query run [a, b): cu_seqlens of its query rows and of its keys (both from 0), and the global
    position of its first key."""
    docs = [(s, e) for s, e in zip(bounds, bounds[1:]) if s < e and s < b and e > a]
    key_start = docs[0][0]
    cu_q, cu_k = [0], [0]
    for s, e in docs:
        cu_q.append(cu_q[-1] + min(e, b) - max(s, a))
        cu_k.append((min(e, b) if causal else e) - key_start)
    return cu_q, cu_k, key_start


def _tokens_heads_dims(x: torch.Tensor) -> torch.Tensor:
    """(1, H, S, D) -> (S, H, D), contiguous as varlen kernels need."""
    return x.squeeze(0).transpose(0, 1).contiguous()


def packed_attention(kernel: VarlenKernel, call: AttentionCall, bounds: list[int], spec: AllGatherSpec) -> torch.Tensor:
    """This rank's packed output (local tokens, Hq, Dv). `call` holds (1, H, S_local, D) views of the packed
    local q, k, v; every rank must call this (the K/V all-gather is a collective)."""
    keys = _tokens_heads_dims(GatherSequence.apply(call.key, spec))
    values = _tokens_heads_dims(GatherSequence.apply(call.value, spec))
    return gathered_runs(kernel, call, bounds, spec.q_positions.tolist(), keys, values)


def gathered_runs(kernel: VarlenKernel, call: AttentionCall, bounds: list[int], q_positions: list[int],
                  keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One varlen call per run of the local queries (global positions `q_positions`) against the gathered
    (S, Hkv, D) keys and values in global order."""
    q = call.query.squeeze(0).transpose(0, 1)  # the caller's packed (S_local, Hq, D) tensor again
    outs = []
    for local, a, b in query_runs(q_positions):
        cu_q, cu_k, key_start = run_segments(bounds, a, b, call.is_causal)
        lengths_q = [y - x for x, y in zip(cu_q, cu_q[1:])]
        lengths_k = [y - x for x, y in zip(cu_k, cu_k[1:])]
        as_tensor = lambda cu: torch.tensor(cu, dtype=torch.int32, device=q.device)  # noqa: E731
        outs.append(kernel(
            q[local:local + b - a], keys[key_start:key_start + cu_k[-1]], values[key_start:key_start + cu_k[-1]],
            as_tensor(cu_q), as_tensor(cu_k), max(lengths_q), max(lengths_k),
        ))
    if not outs:  # this rank holds no token; its output still depends on the gathered K/V, so that its backward
        # takes part in their reduce-scatter like every other rank's (a rank that skipped it would stall the rest)
        return q.new_zeros(0, q.shape[1], call.value.shape[-1]) + (keys[:0].sum() + values[:0].sum())
    return torch.cat(outs, dim=0)
