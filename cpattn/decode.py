"""Decode against a KV cache split over ranks: a few new tokens, the same on every rank, attend to every
rank's slice of the cache.

Each rank attends to its own slice on the active provider and gets a partial (out, lse); one all-gather of
those partials (float32) and one merge through their log-sum-exps give every rank the whole output:
out = sum_r out_r * exp(lse_r - logsumexp_r lse_r). A slice may be empty (zero keys: out 0, lse -inf) and
lengths may differ between ranks. With positions the call is causal (a new token sees cached keys at its
position or before, and the new tokens before it) and a window limits how far back it sees; sinks enter once,
after the merge. GQA runs on the provider's own grouped heads, without repeating key/value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import scoremods
from .call import checked_window, make_call
from .contract import AttentionCall
from .cp.comm import gather_signatures
from .cp.mesh import topology_from_mesh
from .errors import InvalidArgumentError, RankMismatchError, UnsupportedInputError
from .ops.merge import merge_packed, pack_partial
from .ops.sinks import add_sinks
from .ops.window import band_mask, shifted, trim_block
from .providers import suggest
from .state import current_state

_TIMEOUT = 60.0
_FIELDS = ("batch", "query heads", "key/value heads", "new tokens", "head dim", "value head dim", "dtype",
           "positions given", "window left", "sinks given")


@torch.no_grad()
def sharded_kv_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mesh, *,
                         scale: float | None = None, enable_gqa: bool = False,
                         window: "tuple[int | None, int | None] | None" = None, sinks: torch.Tensor | None = None,
                         query_positions: torch.Tensor | None = None,
                         key_positions: torch.Tensor | None = None, agree: bool = True) -> torch.Tensor:
    """Attention of `query` (B, Hq, Sq, D), the same on every rank of `mesh`, over the KV cache whose slice this
    rank holds (`key`, `value`: (B, Hkv, Sk_rank, D / Dv), Sk_rank free to differ, zero included); returns the
    whole (B, Hq, Sq, Dv) output on every rank, in query's dtype.

    `query_positions` (Sq,) and `key_positions` (Sk_rank,) are global token positions: given, a query sees the
    keys at its position or before (causal), and within `window=(left, right)` (right must be 0 or None: later
    tokens are not in a cache). Without positions every query sees every cached key and no window applies.
    `sinks`: (Hq,) logits in every row's denominator, once. The provider is the active one
    (`attention_provider`); it must return a log-sum-exp. Inference only (no gradients).

    `agree=False` skips the agreement check, one small all-gather of every rank's call signature read on the
    host: a decode loop whose first step checked the same call may skip it on later steps (a CUDA graph must,
    since capture forbids reading device values on the host). Ranks that then disagree on shapes reach a combine
    whose sizes differ, which the check exists to prevent. A one-rank group never runs it. Positions given as
    tensors are read on the host too (to find consecutive runs), so a captured call passes none."""
    provider = current_state().provider
    topology = topology_from_mesh(mesh)
    if topology.mesh_dims != 1:
        raise InvalidArgumentError("sharded_kv_attention takes a 1-D mesh or process group (the cache's ranks)")
    group = topology.ring
    call = make_call(query, key, value, None, 0.0, False, scale, enable_gqa, sharded=True, sinks=sinks)
    window = checked_window(window)
    _check_positions(call, window, query_positions, key_positions)
    reasons = provider.reasons(call.replace(sinks=None), need_lse=True)
    if agree and group.size > 1:
        _agree(call, window, query_positions is not None, bool(reasons), group)
    if reasons:
        raise UnsupportedInputError(f"provider '{provider.name}' in sharded_kv_attention", reasons,
                                    suggest(call.replace(sinks=None), provider.name, need_lse=True))
    out, lse = _local_partial(provider, call.replace(sinks=None), window, query_positions, key_positions)
    out, lse = _combine(out, lse, group, query.dtype if sinks is None else torch.float32)
    if sinks is not None:
        out, lse = add_sinks(out, lse, sinks)
    return out.to(query.dtype)


def _check_positions(call: AttentionCall, window, query_positions, key_positions) -> None:
    if (query_positions is None) != (key_positions is None):
        raise InvalidArgumentError("pass both query_positions and key_positions (global token positions), or "
                                   "neither")
    if window is not None and query_positions is None:
        raise InvalidArgumentError("a window needs query_positions and key_positions: it is measured in positions")
    if window is not None and window[1] not in (None, 0):
        raise InvalidArgumentError(f"window={window}: the right side must be 0 or None (a query sees no later "
                                   "token in a KV cache)")
    for name, positions, length in (("query_positions", query_positions, call.q_len),
                                    ("key_positions", key_positions, call.kv_len)):
        if positions is not None and (positions.dim() != 1 or positions.shape[0] != length
                                      or positions.dtype.is_floating_point):
            raise InvalidArgumentError(f"{name} must be integer positions of shape ({length},), got "
                                       f"{positions.dtype} {tuple(positions.shape)}")


def _agree(call: AttentionCall, window, has_positions: bool, refused: bool, group) -> None:
    """Every rank must make the same call (its own cache slice aside): one small all-gather, bounded."""
    left = -1 if window is None or window[0] is None else window[0]
    dtype = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}.get(call.dtype, 0)
    sig = [call.batch, call.q_heads, call.kv_heads, call.q_len, call.head_dim, call.value_dim, dtype,
           int(has_positions), left, int(call.sinks is not None), int(refused)]
    table = gather_signatures(sig, group, _TIMEOUT, call.device).tolist()
    for i, name in enumerate(_FIELDS):
        column = [row[i] for row in table]
        if len(set(column)) > 1:
            raise RankMismatchError(f"ranks of sharded_kv_attention disagree on {name}: "
                                    + ", ".join(f"rank {r}: {x}" for r, x in enumerate(column))
                                    + ". Every rank passes the same new tokens against its own cache slice.")
    refusing = [r for r, row in enumerate(table) if row[-1]]
    if refusing and not refused:
        raise UnsupportedInputError("sharded_kv_attention", [f"rank(s) {refusing} refused this call; their error "
                                                             "lists the reasons"])


def _local_partial(provider, call: AttentionCall, window, query_positions, key_positions):
    """(out, lse) of the new tokens over this rank's slice, float32 lse, -inf (and out 0) where nothing is seen."""
    b, h, sq, dv = call.batch, call.q_heads, call.q_len, call.value_dim
    out = call.query.new_zeros(b, h, sq, dv)
    lse = torch.full((b, h, sq), float("-inf"), device=call.device)
    if call.kv_len == 0:
        return out, lse
    if query_positions is None:
        return _forward(provider, call)
    band = ((None if window is None else window[0]), 0)
    if _consecutive(query_positions) and _consecutive(key_positions):  # the usual cache: a band, trimmed
        q0, k0 = int(query_positions[0]), int(key_positions[0])
        block = trim_block(sq, call.kv_len, shifted(band, q0, k0))
        if block is None:
            return out, lse
        sub = call.replace(query=call.query[:, :, block.q0:block.q1], key=call.key[:, :, block.k0:block.k1],
                           value=call.value[:, :, block.k0:block.k1], window=block.window)
        out[:, :, block.q0:block.q1], lse[:, :, block.q0:block.q1] = _forward(provider, sub)
        return out, lse
    allowed = band_mask(query_positions.to(call.device), key_positions.to(call.device), band)
    return _forward(provider, call.replace(attn_mask=allowed))


def _forward(provider, call: AttentionCall):
    out, lse = provider.forward(scoremods.as_kernel_call(provider, call))
    return out, lse.float()


def _consecutive(positions: torch.Tensor) -> bool:
    return positions.numel() < 2 or bool((positions[1:] - positions[:-1] == 1).all())


def _combine(out: torch.Tensor, lse: torch.Tensor, group, dtype: torch.dtype):
    """(out in `dtype`, lse) over every rank's slice: one all-gather of every rank's (out, lse) packed into one
    float32 buffer, then one merge (one kernel each way on CUDA: cpattn.ops.merge.pack_partial, merge_packed)."""
    if group.size == 1:
        return out.to(dtype), lse
    packed = pack_partial(out, lse)
    on_cpu = group.backend == "gloo" and packed.is_cuda  # gloo moves host memory
    send = packed.cpu() if on_cpu else packed
    gathered = send.new_empty((group.size * send.shape[0], *send.shape[1:]))  # ranks' blocks along dim 0
    dist.all_gather_into_tensor(gathered, send, group=group.pg)
    return merge_packed(gathered.view(group.size, *send.shape).to(out.device), dtype)
