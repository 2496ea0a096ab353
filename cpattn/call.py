"""The call and its signature: SDPA's argument checks, independent of any provider, and the key under which an
accepted call's runner is remembered."""

from __future__ import annotations

import math

import torch

from .contract import AttentionCall, default_scale
from .errors import InvalidArgumentError
from .masks import is_mask_mod


def make_call(
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sharded: bool = False, *,
    window=None, softcap=None, sinks=None, kv_replicated: bool = False,
) -> AttentionCall:
    """Check the arguments as SDPA would (independent of provider), and the score modifications (window,
    softcap, sinks), and resolve defaults.

    `sharded`: inputs are context-parallel shards; the mask covers local rows x all keys, and its row and
    key lengths are checked by the schedule once the global length is known.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise InvalidArgumentError(
                f"{name} must have 4 dims (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}"
            )
    if not (query.dtype == key.dtype == value.dtype):
        raise InvalidArgumentError(
            f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if not query.dtype.is_floating_point:
        raise InvalidArgumentError(f"attention needs floating-point inputs, got {query.dtype}")
    if sharded and (query.is_nested or key.is_nested or value.is_nested):
        raise InvalidArgumentError(
            "context parallelism shards dense sequences; nested (jagged) tensors cannot be sharded: pad them, or "
            "pack the sequences and call cpattn.flash_varlen_attention with their global cu_seqlens"
        )
    if not (query.device == key.device == value.device):
        raise InvalidArgumentError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    b, hq, sq, d = query.shape
    _, hk, sk, dk = key.shape
    if key.shape[0] != b or value.shape[0] != b:
        raise InvalidArgumentError(f"batch sizes differ: query {b}, key {key.shape[0]}, value {value.shape[0]}")
    if dk != d:
        raise InvalidArgumentError(f"query head dim {d} != key head dim {dk}")
    if value.shape[1] != hk or value.shape[2] != sk:
        raise InvalidArgumentError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in heads and seq_len"
        )
    if hq != hk:
        if not enable_gqa:
            raise InvalidArgumentError(
                f"query has {hq} heads but key/value have {hk}: pass enable_gqa=True for grouped-query attention"
            )
        if hq % hk:
            raise InvalidArgumentError(f"query heads {hq} must be a multiple of key/value heads {hk} for GQA")
    if not 0.0 <= dropout_p < 1.0:
        raise InvalidArgumentError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if is_mask_mod(attn_mask):
        if not sharded:
            raise InvalidArgumentError("a callable attn_mask must be materialized before make_call")
    elif attn_mask is not None:
        _check_mask(attn_mask, query, (b, hq, sq, sk), sharded)
    if scale is None:
        scale = default_scale(d)
    return AttentionCall(query, key, value, attn_mask, bool(is_causal), float(scale), float(dropout_p), enable_gqa,
                         checked_window(window), checked_softcap(softcap), checked_sinks(sinks, query),
                         _checked_kv_replicated(kv_replicated, sharded))


def _checked_kv_replicated(kv_replicated, sharded: bool) -> bool:
    if not isinstance(kv_replicated, bool):
        raise InvalidArgumentError(f"kv_replicated must be True or False, got {kv_replicated!r}")
    return kv_replicated and sharded  # one device: key/value are whole anyway


def checked_window(window) -> "tuple[int | None, int | None] | None":
    """`window=(left, right)`: ints >= 0 or None (unbounded) on each side; (None, None) is no window at all."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise InvalidArgumentError(f"window must be (left, right) with ints >= 0 or None, got {window!r}")
    for side in window:
        if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 0):
            raise InvalidArgumentError(
                f"window={tuple(window)!r}: each side must be an int >= 0 (tokens to the left / right a query "
                "sees) or None (unbounded)")
    left, right = (None if side is None else int(side) for side in window)
    return None if left is None and right is None else (left, right)


def checked_softcap(softcap) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < math.inf:
        raise InvalidArgumentError(f"softcap={softcap!r} must be a positive, finite number (scores become "
                                   "softcap * tanh(scores / softcap))")
    return float(softcap)


def checked_sinks(sinks, query) -> torch.Tensor | None:
    if sinks is None:
        return None
    heads = query.shape[1]
    if not isinstance(sinks, torch.Tensor) or not sinks.dtype.is_floating_point:
        raise InvalidArgumentError(f"sinks must be a floating-point tensor of shape ({heads},) (one logit per query "
                                   f"head), got {type(sinks).__name__}")
    if tuple(sinks.shape) != (heads,):
        raise InvalidArgumentError(f"sinks must have shape ({heads},) (one logit per query head), got "
                                   f"{tuple(sinks.shape)}")
    if sinks.device != query.device:
        raise InvalidArgumentError(f"sinks are on {sinks.device} but query is on {query.device}")
    return sinks


def _check_mask(mask, query, full_shape, sharded: bool) -> None:
    if not isinstance(mask, torch.Tensor):
        raise InvalidArgumentError(f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise InvalidArgumentError(f"attn_mask must be bool (True = attend) or float (added), got {mask.dtype}")
    if mask.device != query.device:
        raise InvalidArgumentError(f"attn_mask is on {mask.device} but query is on {query.device}")
    if mask.dim() > 4:
        raise InvalidArgumentError(f"attn_mask has {mask.dim()} dims; at most 4 (batch, heads, q_len, kv_len)")
    checked = list(zip(reversed(mask.shape), reversed(full_shape)))
    for have, want in checked[2:] if sharded else checked:
        if have not in (1, want):
            raise InvalidArgumentError(
                f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (batch, heads, q_len, kv_len) = "
                f"{full_shape}"
            )


def call_signature(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> tuple | None:
    """Everything the argument checks and a provider's verdict depend on (shapes, dtypes, devices, flags, and
    whether deterministic algorithms are on: some backward kernels are refused then).

    One flat tuple of the values as given: building and hashing it is most of what a cached call costs, so
    nothing is normalised here (is_causal=1 and True, or dropout_p=0 and 0.0, hash and compare equal anyway).
    """
    try:
        shapes = query.shape, key.shape, value.shape
        types = query.dtype, key.dtype, value.dtype, query.device, key.device, value.device
        grad = query.requires_grad or key.requires_grad or value.requires_grad
    except AttributeError:
        return None  # never accepted: make_call raises the clear error
    # No isinstance checks: an object that has these attributes without being a tensor (a NumPy array) gets a key
    # with its own dtypes, which no accepted call has, so it takes the checked path and make_call's error.
    if attn_mask is not None:
        attn_mask = (attn_mask.shape, attn_mask.dtype, attn_mask.device, attn_mask.requires_grad) \
            if isinstance(attn_mask, torch.Tensor) else type(attn_mask)
    return (shapes, types, attn_mask, dropout_p, is_causal, scale, enable_gqa, _grad_enabled() and grad,
            _deterministic())


_grad_enabled = torch._C.is_grad_enabled  # what torch.is_grad_enabled returns, without its Python frame
_deterministic = torch._C._get_deterministic_algorithms
