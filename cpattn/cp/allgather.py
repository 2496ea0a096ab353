"""All-gather KV: every rank gathers the whole key/value sequence and attends its local queries to it.

For providers that return no log-sum-exp or have no backward (so cannot ring), and where simplicity beats
memory: KV of every rank is all-gathered once (uneven lengths allowed), put in global order, and the
provider runs one ordinary call. Causal attention becomes a positional mask (query position >= key
position), because local queries are not a contiguous prefix under the zigzag layout; so causal or masked
calls need a provider that takes boolean masks. Backward sums each rank's dK/dV over ranks and keeps
this rank's part (reduce-scatter). With a replicated prefix or suffix (cp/prefix.py) the local prefix KV goes in front (the suffix KV behind)
of the gathered KV. `ALLGATHER` is the schedule; packed sequences (packed.py) gather the same way.

A window runs per local chunk instead (`windowed_rows`): each chunk's rows against the keys its window reaches,
the window (causality in it) in the chunk's coordinates, natively or as the exact mask. A softcap goes to the
call as it is, sinks too: every local row is in exactly one call, so it takes them once, and its gradient is this
rank's rows' share (the all-reduce of the replicated sinks adds the shares).
This module never names a provider.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..contract import AttentionCall, Provider, band
from ..masks import is_mask_mod, select_keys, select_queries
from ..ops.window import shifted, trim_block
from ..scoremods import attention
from .comm import CommStats, all_gather_padded, all_reduce_sum
from .halo import shard_runs
from .kernel_checks import reasons_for_any_total
from .layout import gathered_order, local_len, ring_positions
from .mesh import Group
from .schedule import Agreed, KernelShape, Setup, Suggest, can_ring, with_example


@dataclass
class AllGatherSpec:
    group: Group
    lengths: list[int]  # local length of every rank
    q_positions: torch.Tensor  # global positions of this rank's queries
    order: torch.Tensor  # gathered (rank-major) index -> global order
    positions: torch.Tensor  # global position of each gathered index
    timeout: float | None  # None: see comm._wait
    stats: CommStats
    layout: str  # whose chunks this rank's queries are (windowed_rows)

    @property
    def total(self) -> int:
        return int(sum(self.lengths))


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
    if call.window is not None:
        return windowed_rows(provider, call, spec, key, value)
    return attention(provider, call.replace(key=key, value=value, attn_mask=positional_mask(call, spec),
                                            is_causal=False))


def windowed_rows(provider: Provider, call: AttentionCall, spec: AllGatherSpec, key: torch.Tensor,
                  value: torch.Tensor) -> torch.Tensor:
    """Each of this rank's chunks (one, or two under zigzag) as its own call against the keys its window reaches
    in the gathered (global-order) key/value: the window in the chunk's coordinates (`shifted`, `trim_block`),
    causality in it, the sinks in each call (the chunks' rows are disjoint, so every row takes them once).
    Rows the window leaves without a key get out 0, and no gradient."""
    band_ = band(call)
    pieces, done = [], 0
    for run in shard_runs(spec.total, spec.group.size, spec.group.rank, spec.layout):
        cut = trim_block(run.size, spec.total, shifted(band_, run.position, 0))
        if cut is None:
            continue
        rows, keys = slice(run.start + cut.q0, run.start + cut.q1), slice(cut.k0, cut.k1)
        pieces.append(_zero_rows(call, rows.start - done))
        mask = select_queries(select_keys(call.attn_mask, keys), rows)
        pieces.append(attention(provider, call.replace(
            query=call.query[:, :, rows].contiguous(), key=key[:, :, keys], value=value[:, :, keys],
            attn_mask=mask, is_causal=False, window=cut.window)))
        done = rows.stop
    pieces.append(_zero_rows(call, call.q_len - done))
    out = torch.cat(pieces, dim=2)
    if done == 0 and torch.is_grad_enabled():  # no call ran, yet the gathers' backward needs every rank
        out = Untouched.apply(out, call.query, key, value)
    return out


class Untouched(torch.autograd.Function):
    """`out`, which does not depend on `inputs`, made to depend on them with a zero gradient: a rank whose queries
    reach no key must still enter the all-reduce of the gathers' backward, as every rank does, and its inputs
    get a gradient (of zeros) like every other rank's."""

    @staticmethod
    def forward(ctx, out, *inputs):
        ctx.inputs = [(x.shape, x.dtype, x.device) for x in inputs]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.inputs)


def _zero_rows(call: AttentionCall, n: int) -> torch.Tensor:
    return call.query.new_zeros(call.batch, call.q_heads, n, call.value_dim)


def prefix_allgather_attention(provider: Provider, call: AttentionCall, spec: AllGatherSpec,
                               prefix: int, suffix: int = 0) -> torch.Tensor:
    """Gather the sharded KV into global order between the local prefix and suffix KV, one ordinary call."""
    end = call.kv_len - suffix

    def whole(x):
        return torch.cat([x[:, :, :prefix], GatherSequence.apply(x[:, :, prefix:end], spec), x[:, :, end:]], dim=2)
    return attention(provider, call.replace(key=whole(call.key), value=whole(call.value)))


# -- the schedule ---------------------------------------------------------------------------------------------

def allgather_spec(cp: Setup, total: int, device) -> AllGatherSpec:
    """The all-gather over the 1-D group of `cp` for `total` tokens."""
    group = cp.topology.ring
    lengths = [local_len(total, group.size, 1, r, 0, cp.layout) for r in range(group.size)]
    order, positions = gathered_order(total, group.size, cp.layout, device)
    if order is None:
        order = torch.arange(total, device=device)
    q_positions = ring_positions(total, group.size, group.rank, cp.layout, device)
    return AllGatherSpec(group, lengths, q_positions, order, positions, cp.data_timeout, cp.stats, cp.layout)


def _takes_positional_mask(provider: Provider, call: AttentionCall) -> bool:
    """The provider takes the (local rows x all keys) mask that causality and the call's mask become."""
    caps = provider.capabilities(call.device.type)
    return caps is not None and caps.bool_mask and (
        call.attn_mask is None or call.mask_kind in ("bool", "key_padding", "mask_mod") or caps.additive_mask)


def _with_positional_mask(call: AttentionCall) -> AttentionCall:
    """`call` as its kernel sees it, for the providers' checks only: causality and the mask as one 2-D mask of
    the mask's kind (a zero-stride view; the checks read its kind, never its values)."""
    if not call.is_causal and call.attn_mask is None:
        return call
    mask = call.attn_mask
    dtype = mask.dtype if isinstance(mask, torch.Tensor) and not is_mask_mod(mask) else torch.bool
    stand_in = torch.zeros((), dtype=dtype, device=call.device).expand(call.q_len, call.kv_len)
    return call.replace(attn_mask=stand_in, is_causal=False)


class AllGatherSchedule:
    name = "allgather"
    mesh_dims = 1
    takes_prefix = True
    auto_order = 10  # before the schedules that need a log-sum-exp: it takes providers that cannot ring
    mask_mod_per_block = False

    def auto(self, cp: Setup, provider: Provider, call: AttentionCall) -> str | None:
        if cp.replicated:
            return None if can_ring(provider, call) else "replicated tokens with a provider that cannot ring"
        if provider.capabilities(call.device.type) is not None and not can_ring(provider, call):
            return f"{provider.name} returns no LSE or has no LSE backward, so it cannot ring"
        return None

    def reasons(self, cp: Setup, provider: Provider, call: AttentionCall) -> list[str]:
        out = reasons_for_any_total(cp, self, provider, call)
        positional = call.window is None  # a window runs per chunk, causality in its band (windowed_rows)
        if positional and (call.is_causal or call.attn_mask is not None) and not _takes_positional_mask(provider,
                                                                                                         call):
            out.append("all-gather expresses causal and masks as a positional attn_mask, which this "
                       "provider does not take")
        return out

    def kernel_shapes(self, cp: Setup, call: AttentionCall, total: int, lengths: list[int]) -> set[KernelShape]:
        if call.is_causal or call.window is not None:  # a mask or trimmed windows: left to the shard check
            return set()
        return {(n + cp.replicated, total + cp.replicated, False) for n in lengths}

    def suggestion(self, provider: Provider, call: AttentionCall, suggest: Suggest | None) -> str:
        return with_example("cp_strategy='ring' with a provider that returns a log-sum-exp, or a provider that "
                            "takes boolean masks",
                            suggest(_with_positional_mask(call), provider.name) if suggest else None)

    def run(self, cp: Setup, provider: Provider, call: AttentionCall, agreed: Agreed) -> torch.Tensor:
        spec = allgather_spec(cp, agreed.total, call.device)
        if cp.replicated:
            return prefix_allgather_attention(provider, call, spec, cp.prefix, cp.suffix)
        return allgather_attention(provider, call, spec)


ALLGATHER = AllGatherSchedule()
