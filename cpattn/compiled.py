"""`attention_dispatch` inside `torch.compile`: the single-device kernel call as a torch.library custom op.

A leaf: it registers the ops and imports nothing above the per-call state; only cpattn.dispatch imports it.

Dynamo cannot trace `ContextVar.get` (where `attention_provider` keeps its state), nor the provider objects and
dataclasses behind it: every `attention_dispatch` call would break the graph. While compiling, dispatch puts one
opaque op in the graph instead (cpattn.dispatch._compiled_attention):

* ``cpattn::attention_fwd(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, needs_grad)
  -> (out, lse, provider_id)``
* ``cpattn::attention_bwd(dout, q, k, v, mask, out, lse, provider_id, ...) -> (dq, dk, dv)``

Their real implementations run outside the graph, at run time: the forward reads the active provider from the
ContextVar *then* (so `with attention_provider(...)` around a compiled model takes effect without recompiling,
per thread, as in eager), checks the call exactly as eager dispatch does (same errors), and runs the provider's
contract `forward`; the backward runs the same provider's `backward` with the global (out, lse) (recomputing
through the library's autograd for providers that only have that). `provider_id` carries the forward's provider
to the backward, which may run after the `with` block has closed. Fake implementations give shapes to the graph.

Graph breaks that remain (documented; each runs the eager path, then tracing resumes):
* Context parallelism: a call made while an `attention_provider(..., cp_mesh=...)` block with more than one
  rank is open runs the CP schedule eagerly (collectives, autograd functions, agreement checks): one graph break
  per attention call. `fullgraph=True` therefore fails under CP. Whether a CP block is open is read at trace time
  from a counter that dynamo guards on, so entering or leaving CP recompiles instead of running the wrong path.
* `dropout_p > 0` and an `attn_mask` that requires grad take the eager path too (the contract's forward has no
  dropout and its backward no mask gradient).
"""

from __future__ import annotations

from typing import Optional

import torch

from .call import make_call
from .contract import AttentionCall, autocast_off
from .errors import CpattnError, UnsupportedInputError
from .providers import provider_code, provider_of_code, suggest
from .state import current_state


def _has_contract_backward(provider, call: AttentionCall) -> bool:
    caps = provider.capabilities(call.device.type)
    return caps is not None and caps.backward and caps.returns_lse


def _call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> AttentionCall:
    return AttentionCall(query, key, value, attn_mask, bool(is_causal), float(scale), float(dropout_p), enable_gqa)


@torch.library.custom_op("cpattn::attention_fwd", mutates_args=())
def attention_fwd(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
    dropout_p: float, is_causal: bool, scale: float, enable_gqa: bool, needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    state = current_state()  # run time: the provider active now, in this thread
    if state.cp is not None and state.cp.world_size > 1:
        raise CpattnError(
            "a graph compiled for single-device attention ran inside attention_provider(..., cp_mesh=...) "
            "(entered by another thread while it ran?); call the compiled model again to recompile for CP"
        )
    provider = state.provider
    call = make_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    # Autograd sits outside this op: check the call as eager would see it, with gradients if the graph wants them.
    with torch.set_grad_enabled(needs_grad):
        reasons = provider.reasons(call.replace(query=query.detach().requires_grad_(needs_grad)))
    if reasons:
        raise UnsupportedInputError(f"provider '{provider.name}'", reasons, suggest(call, provider.name))
    if _has_contract_backward(provider, call):
        out, lse = provider.forward(call)
    else:  # no contract forward/backward: the single-device path (the backward recomputes through it)
        out = provider.attention(call)
        lse = query.new_empty(call.batch, call.q_heads, call.q_len, dtype=torch.float32)
    provider_id = torch.tensor(provider_code(provider), dtype=torch.int64)
    return out.contiguous(), lse.contiguous(), provider_id


@attention_fwd.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, needs_grad):
    b, hq, sq, _ = query.shape
    out = query.new_empty(b, hq, sq, value.shape[-1])
    lse = query.new_empty(b, hq, sq, dtype=torch.float32)
    return out, lse, torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("cpattn::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attn_mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor, provider_id: torch.Tensor,
    is_causal: bool, scale: float, enable_gqa: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    provider = provider_of_code(int(provider_id))
    call = _call(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa)
    with autocast_off(query.device):  # as in eager: the inputs were cast before the forward
        if _has_contract_backward(provider, call):
            dq, dk, dv = provider.backward(call, dout.contiguous(), out, lse)
        else:  # library autograd only: recompute the forward with grad and differentiate it
            with torch.enable_grad():
                q, k, v = (t.detach().requires_grad_(True) for t in (query, key, value))
                o = provider.attention(call.replace(query=q, key=k, value=v))
                dq, dk, dv = torch.autograd.grad(o, (q, k, v), dout)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_bwd.register_fake
def _(dout, query, key, value, attn_mask, out, lse, provider_id, is_causal, scale, enable_gqa):
    # The real op returns contiguous gradients, whatever the inputs' strides.
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape))


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, _, is_causal, scale, enable_gqa, _ = inputs
    out, lse, provider_id = output
    ctx.save_for_backward(query, key, value, attn_mask, out, lse, provider_id)
    ctx.flags = (is_causal, scale, enable_gqa)
    ctx.mark_non_differentiable(lse, provider_id)


def _backward(ctx, dout, _dlse, _did):
    query, key, value, attn_mask, out, lse, provider_id = ctx.saved_tensors
    dq, dk, dv = attention_bwd(dout, query, key, value, attn_mask, out, lse, provider_id, *ctx.flags)
    return dq, dk, dv, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
