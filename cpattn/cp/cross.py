"""Cross-attention under context parallelism: queries sharded, key/value whole on every rank.

Text or encoder tokens attended by a sharded sequence (a DiT's cross-attention to its prompt, a decoder's to its
encoder): every rank holds the same keys and values, so each rank's attention over them is already exact and
nothing moves. A call is this kind when it says so (`kv_replicated=True`) or when its key length differs from
its local query length (self-attention shards both alike); the agreement check makes sure every rank takes it so
and passes the same key length, before anything runs.

Each rank then makes one ordinary call for its own query rows, whatever cp_strategy says: the window, softcap
and sinks as on one device (scoremods.attention), a mask given as this rank's query rows by all keys, or a key
padding mask (B, 1, 1, Sk) as it is. Causal attention and windows are refused: the keys have no positions among
the sharded queries', so neither has a meaning to be exact about.

Gradients: each rank's key/value gradient is its own rows' contribution; summed over the ranks (the usual gradient
all-reduce of the parameters the keys and values come from, e.g. the encoder's) it is the whole gradient, as for
the replicated prefix of joint attention (prefix.py). The sinks' gradient likewise: each rank's rows' share.
"""

from __future__ import annotations

import torch

from ..contract import AttentionCall, Provider
from ..masks import is_mask_mod, materialize_mask_mod
from ..scoremods import attention
from .layout import local_positions
from .schedule import Setup


def kv_replicated(call: AttentionCall) -> bool:
    """Key/value are whole on every rank: declared, or implied by a key length other than the local query length."""
    return call.kv_replicated or call.kv_len != call.q_len


def cross_faults(call: AttentionCall, replicated: int) -> list[str]:
    """What a cross-attention call cannot be under context parallelism, from this rank's call alone."""
    out = []
    how = (f"key/value replicated on every rank (cross-attention: {call.kv_len} keys, {call.q_len} local queries"
           + (", kv_replicated=True" if call.kv_replicated else "") + ")")
    if replicated:
        out.append(f"{how} does not combine with cp_replicated_prefix or cp_replicated_suffix, which are "
                   "self-attention over replicated tokens and a sharded sequence")
    if call.is_causal:
        out.append(f"is_causal with {how}: the keys have no positions among the sharded queries', so causality "
                   "has no meaning here; pass is_causal=False (a mask of this rank's query rows x all keys, if "
                   "some keys must be hidden)")
    if call.window is not None:
        out.append(f"window={call.window} with {how}: the keys have no positions among the sharded queries'; pass "
                   "attn_mask (this rank's query rows x all keys) instead")
    mask = call.attn_mask if isinstance(call.attn_mask, torch.Tensor) else None
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        out.append("gradients with respect to attn_mask are not supported under context parallelism: pass "
                   "attn_mask.detach()")
    if mask is not None and (mask.shape[-1] not in (1, call.kv_len)
                             or mask.dim() >= 2 and mask.shape[-2] not in (1, call.q_len)):
        out.append(f"attn_mask of shape {tuple(mask.shape)}: with {how} it covers this rank's {call.q_len} query "
                   f"rows (or 1, broadcast) by all {call.kv_len} keys (or 1), e.g. key padding (B, 1, 1, "
                   f"{call.kv_len})")
    return out


def cross_reasons(provider: Provider, call: AttentionCall) -> list[str]:
    """Why the provider cannot make this rank's one local call."""
    return provider.reasons(call)


def cross_attention(cp: Setup, provider: Provider, call: AttentionCall, total: int) -> torch.Tensor:
    """This rank's queries against the whole key/value: one local call (a mask_mod evaluated at this rank's global
    query positions by key positions 0..Sk-1)."""
    if is_mask_mod(call.attn_mask):
        t = cp.topology
        rows = local_positions(total, t.ring_size, t.ulysses_size, t.ring_rank, t.ulysses_rank, cp.layout,
                               call.device)
        keys = torch.arange(call.kv_len, device=call.device)
        call = call.replace(attn_mask=materialize_mask_mod(call.attn_mask, call.batch, call.q_heads, rows, keys))
    return attention(provider, call.replace(kv_replicated=False))
