"""Joint attention with a replicated prefix: text tokens on every rank, image/video tokens sharded.

DiT-style joint attention concatenates a short text sequence (the same on every rank) with a long sharded
sequence. Treating the text as if it were sharded would count its keys W times in every softmax (a known
source of visibly wrong video). Here the prefix KV is one extra block that every rank holds locally and
never sends: each rank's queries (prefix rows and its shard's rows) attend to the prefix block once and to
the sharded KV through the ring or all-gather, and the partial results merge through their log-sum-exp.

Gradients: the prefix's output is the same on every rank; each rank's gradients for prefix inputs are its
own contribution (from the dout it was handed), so summing them over the group, as the usual gradient
all-reduce of replicated parameters does, gives the full gradient. Split a prefix dout across ranks
(e.g. dout / W on each) when the loss itself is computed redundantly on every rank.
"""

from __future__ import annotations

import torch

from ..contract import AttentionCall, Provider, autocast_off
from ..ops.merge import merge_two
from .allgather import AllGatherSpec, GatherSequence
from .ring import RingSpec, ring_backward, ring_forward_keeping_last


def _split(call: AttentionCall, prefix: int):
    key, value = call.key, call.value
    return (key[:, :, :prefix].contiguous(), value[:, :, :prefix].contiguous(),
            key[:, :, prefix:].contiguous(), value[:, :, prefix:].contiguous())


def _prefix_ring_forward(provider: Provider, call: AttentionCall, spec: RingSpec, prefix: int):
    """All local query rows against the local prefix KV block, merged with the ring over the sharded KV."""
    k_pre, v_pre, k_shard, v_shard = _split(call, prefix)
    out_p, lse_p = provider.forward(call.replace(key=k_pre, value=v_pre))
    out_r, lse_r, last = ring_forward_keeping_last(provider, call.replace(key=k_shard, value=v_shard), spec)
    out, lse = merge_two(out_p, lse_p, out_r, lse_r)
    return out.to(call.dtype), lse, last


class PrefixRingAttention(torch.autograd.Function):
    """Autograd over `_prefix_ring_forward`; backward splits into the prefix block and the ring."""

    @staticmethod
    def forward(ctx, query, key, value, provider, call, spec, prefix):
        call = call.replace(query=query, key=key, value=value)
        out, lse, last = _prefix_ring_forward(provider, call, spec, prefix)
        ctx.provider, ctx.spec, ctx.prefix, ctx.call = provider, spec, prefix, call
        ctx.save_for_backward(query, key, value, out, lse, *(last or ()))
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, out, lse, *last = ctx.saved_tensors
        call = ctx.call.replace(query=query, key=key, value=value)
        k_pre, v_pre, k_shard, v_shard = _split(call, ctx.prefix)
        dout = dout.contiguous()
        with autocast_off(query.device):
            dq_p, dk_p, dv_p = ctx.provider.backward(call.replace(key=k_pre, value=v_pre), dout, out, lse)
            dq_r, dk_r, dv_r = ring_backward(ctx.provider, call.replace(key=k_shard, value=v_shard), ctx.spec,
                                             dout, out, lse, last_block=tuple(last) or None)
            dq = (dq_r + dq_p.float()).to(query.dtype)
            dk = torch.cat([dk_p.float(), dk_r], dim=2).to(key.dtype)
            dv = torch.cat([dv_p.float(), dv_r], dim=2).to(value.dtype)
        return dq, dk, dv, None, None, None, None


def prefix_ring_attention(provider: Provider, call: AttentionCall, spec: RingSpec, prefix: int) -> torch.Tensor:
    if call.needs_grad:
        return PrefixRingAttention.apply(call.query, call.key, call.value, provider, call, spec, prefix)
    with torch.no_grad():
        return _prefix_ring_forward(provider, call, spec, prefix)[0]


def prefix_allgather_attention(provider: Provider, call: AttentionCall, spec: AllGatherSpec,
                               prefix: int) -> torch.Tensor:
    """Gather the sharded KV into global order, put the local prefix KV in front, one ordinary call."""
    key = torch.cat([call.key[:, :, :prefix], GatherSequence.apply(call.key[:, :, prefix:], spec)], dim=2)
    value = torch.cat([call.value[:, :, :prefix], GatherSequence.apply(call.value[:, :, prefix:], spec)], dim=2)
    return provider.attention(call.replace(key=key, value=value))

