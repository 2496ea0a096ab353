"""All-gather KV: every rank gathers the whole key/value sequence and attends its local queries to it.

For providers that return no log-sum-exp or have no backward (so cannot ring), and where simplicity beats
memory: KV of every rank is all-gathered once (uneven lengths allowed), put in global order, and the
provider runs one ordinary call. Causal attention becomes a positional mask (query position >= key
position), because local queries are not a contiguous prefix under the zigzag layout; so causal or masked
calls need a provider that takes boolean masks. Backward sums each rank's dK/dV over ranks and keeps
this rank's part (reduce-scatter). This module never names a provider.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..contract import AttentionCall, Provider
from .comm import CommStats, all_gather_padded, all_reduce_sum
from .mesh import Group


@dataclass
class AllGatherSpec:
    group: Group
    lengths: list[int]  # local length of every rank
    q_positions: torch.Tensor  # global positions of this rank's queries
    order: torch.Tensor  # gathered (rank-major) index -> global order
    positions: torch.Tensor  # global position of each gathered index
    timeout: float | None  # None: see comm._wait
    stats: CommStats


class GatherSequence(torch.autograd.Function):
    """All-gather along the sequence into global order; backward sums over ranks and keeps this rank's part."""

    @staticmethod
    def forward(ctx, x, spec: AllGatherSpec):
        ctx.spec = spec
        spec.stats["all_gather"] += 1
        parts = all_gather_padded(x.contiguous(), spec.lengths, 2, spec.group, spec.timeout)
        return torch.cat(parts, dim=2).index_select(2, spec.order.to(x.device))

    @staticmethod
    def backward(ctx, grad):
        spec = ctx.spec
        spec.stats["reduce_scatter"] += 1
        gathered_order = grad.index_select(2, spec.positions.to(grad.device)).contiguous()
        total = all_reduce_sum(gathered_order, spec.group, spec.timeout)
        start = sum(spec.lengths[: spec.group.rank])
        return total.narrow(2, start, spec.lengths[spec.group.rank]), None


def positional_mask(call: AttentionCall, spec: AllGatherSpec) -> torch.Tensor | None:
    """The user's mask (local rows x all keys) combined with causal by global position."""
    mask = call.attn_mask
    if not call.is_causal:
        return mask
    total = int(sum(spec.lengths))
    keys = torch.arange(total, device=call.device)
    causal = keys.unsqueeze(0) <= spec.q_positions.to(call.device).unsqueeze(1)
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, float("-inf"))


def allgather_attention(provider: Provider, call: AttentionCall, spec: AllGatherSpec) -> torch.Tensor:
    key = GatherSequence.apply(call.key, spec)
    value = GatherSequence.apply(call.value, spec)
    return provider.attention(
        call.replace(key=key, value=value, attn_mask=positional_mask(call, spec), is_causal=False)
    )
