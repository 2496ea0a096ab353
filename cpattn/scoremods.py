"""Score modifications a provider's kernel lacks, applied exactly around it: a window as a boolean mask, sinks
through the log-sum-exp (cpattn/ops/sinks.py). A new kind of score modification goes here: its exact route
for kernels without it, and its field on AttentionCall and flag on Capabilities (cpattn/contract.py).

Schedules call `as_kernel_call` on every block before it reaches a kernel, and apply sinks themselves, once, on
the merged result; the single-device path calls `attention`, which does both.
"""

from __future__ import annotations

import torch

from .contract import AttentionCall, Provider, autocast_off, band
from .ops.sinks import add_sinks, sink_grad
from .ops.window import local_band_mask


def as_kernel_call(provider: Provider, call: AttentionCall) -> AttentionCall:
    """`call` as the provider's kernel takes it: a window it lacks becomes part of a boolean (or additive) mask,
    causality folded in (the band holds it). Sinks stay: see `attention` and the schedules."""
    caps = provider.capabilities(call.device.type)
    if call.window is None or caps is None or caps.window:
        return call
    allowed = local_band_mask(call.q_len, call.kv_len, band(call), call.device)
    mask = call.attn_mask
    if mask is None:
        mask = allowed
    elif mask.dtype == torch.bool:
        mask = mask & allowed
    else:
        mask = mask.masked_fill(~allowed, float("-inf"))
    return call.replace(attn_mask=mask, window=None, is_causal=False)


def attention(provider: Provider, call: AttentionCall) -> torch.Tensor:
    """Single-device attention with the call's modifications: natively where the kernel has them, else through
    the exact routes (with autograd)."""
    call = as_kernel_call(provider, call)
    caps = provider.capabilities(call.device.type)
    if call.sinks is None or caps.sinks:
        return provider.attention(call)
    if call.needs_grad or call.sinks.requires_grad and torch.is_grad_enabled():
        return SinksThroughLse.apply(provider, call.replace(sinks=None), call.query, call.key, call.value,
                                     call.sinks)
    with torch.no_grad():
        out, lse = provider.forward(call.replace(sinks=None))
        return add_sinks(out, lse, call.sinks)[0]


class SinksThroughLse(torch.autograd.Function):
    """Sinks added to a provider's (out, lse) after its kernel ran without them; the backward runs its kernel
    with the log-sum-exp that includes them (see cpattn/ops/sinks.py)."""

    @staticmethod
    def forward(ctx, provider, call, query, key, value, sinks):
        call = call.replace(query=query, key=key, value=value)
        out, lse = provider.forward(call)
        out, total = add_sinks(out, lse, sinks)
        ctx.provider, ctx.call = provider, call
        ctx.save_for_backward(query, key, value, out, total, sinks)
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, out, total, sinks = ctx.saved_tensors
        call = ctx.call.replace(query=query, key=key, value=value)
        dout = dout.contiguous()
        dq = dk = dv = None
        with autocast_off(query.device):
            if any(ctx.needs_input_grad[2:5]):
                dq, dk, dv = ctx.provider.backward(call, dout, out, total)
            dsinks = sink_grad(dout, out, total, sinks) if ctx.needs_input_grad[5] else None
        return None, None, dq, dk, dv, dsinks
