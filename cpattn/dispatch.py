"""`attention_dispatch`, the drop-in for F.scaled_dot_product_attention, and the `attention_provider` context.

The active provider (and context-parallel setup) lives in a ContextVar: nesting restores the previous
state, and threads and asyncio tasks each see their own. With no context the provider comes from the
environment variable CPATTN_PROVIDER, else `native`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .contract import AttentionCall, Provider, any_autocast_enabled, default_scale
from .errors import InvalidArgumentError, UnsupportedInputError
from .masks import is_mask_mod, materialize_mask_mod
from .names import AttentionProvider
from .providers import get_provider, suggest

ENV_PROVIDER = "CPATTN_PROVIDER"
CP_OPTIONS = {
    "cp_strategy": ("auto", "ring", "ulysses", "hybrid", "allgather"),
    "cp_layout": ("zigzag", "contiguous"),
    "cp_timeout": None,  # seconds a rank waits for a peer before raising (default 60; given: bounded on NCCL too)
    "cp_replicated_prefix": None,  # tokens at the start of q/k/v that every rank holds whole (joint attention)
    "cp_ring_streams": (2, 1),  # CUDA streams a ring backward's steps take in turn (cpattn/cp/streams.py)
}
PROVIDER_OPTIONS = {
    "autotune": (False, True),  # provider "auto" only: choose per input signature by timing the candidates
}


@dataclass(frozen=True)
class DispatchState:
    provider: Provider
    cp: Any = None  # cpattn.cp.ContextParallel, or None for single-device dispatch
    options: dict = field(default_factory=dict)


_STATE: contextvars.ContextVar[DispatchState | None] = contextvars.ContextVar("cpattn_state", default=None)
# attention_provider blocks with a multi-rank cp_mesh open right now (all threads). torch.compile cannot read the
# ContextVar; it guards on this count instead to trace CP calls eagerly (see cpattn/compiled.py).
open_cp_contexts = 0
_OPEN_CP_LOCK = threading.Lock()
_ENV_CACHE: dict[str, DispatchState] = {}


def _state_from_env() -> DispatchState:
    name = os.environ.get(ENV_PROVIDER, "native") or "native"
    state = _ENV_CACHE.get(name)
    if state is None:
        try:
            provider = get_provider(name)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"environment variable {ENV_PROVIDER}={name!r} is invalid: {exc}") from None
        state = _ENV_CACHE[name] = DispatchState(provider)
    return state


def current_state() -> DispatchState:
    state = _STATE.get()
    return state if state is not None else _state_from_env()


def current_provider() -> Provider:
    return current_state().provider


def _validate_options(options: dict) -> dict:
    known = {**CP_OPTIONS, **PROVIDER_OPTIONS}
    for key, value in options.items():
        if key not in known:
            raise InvalidArgumentError(
                f"unknown attention_provider option {key!r}; known options: {', '.join(known)}"
            )
        allowed = known[key]
        if allowed is not None and (value not in allowed or type(value) is not type(allowed[0])):  # 1 == True
            raise InvalidArgumentError(
                f"option {key}={value!r} is invalid; choose one of {', '.join(map(str, allowed))}")
        if key == "cp_replicated_prefix" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidArgumentError(f"option cp_replicated_prefix={value!r} must be a token count >= 0")
        if key == "cp_timeout" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                    or not 0 < value < math.inf):  # inf would fail at the first wait
            raise InvalidArgumentError(f"option cp_timeout={value!r} must be a positive, finite number of seconds")
    return dict(options)


@contextlib.contextmanager
def attention_provider(
    provider: "str | AttentionProvider", cp_mesh=None, **options
) -> Iterator[DispatchState]:
    """Run `attention_dispatch` calls inside the block on `provider`, context-parallel over `cp_mesh` if given.

    `cp_mesh` is a 1-D DeviceMesh or ProcessGroup (ring / Ulysses / all-gather) or a 2-D DeviceMesh with
    dimensions ("ring", "ulysses") for the hybrid. Options: cp_strategy, cp_layout, cp_timeout,
    cp_replicated_prefix, cp_ring_streams (2, the default, or 1: see cpattn/cp/streams.py); and autotune=True
    with provider "auto" (see cpattn.providers.auto).
    """
    adapter = get_provider(provider)
    opts = _validate_options(options)
    if opts.pop("autotune", False):
        adapter = _autotuned(adapter)
    cp = None
    if cp_mesh is not None:
        from .cp import ContextParallel

        cp = ContextParallel.from_mesh(cp_mesh, **opts)
    elif any(k.startswith("cp_") for k in opts):
        raise InvalidArgumentError(f"options {sorted(opts)} need cp_mesh to be given")
    state = DispatchState(adapter, cp, opts)
    multi_rank = cp is not None and cp.world_size > 1
    if multi_rank:
        _count_cp_context(+1)
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)
        if multi_rank:
            _count_cp_context(-1)


def _autotuned(adapter: Provider) -> Provider:
    from .providers import AUTO, AUTO_TUNED

    if adapter is not AUTO and adapter is not AUTO_TUNED:
        raise InvalidArgumentError(
            f"option autotune=True applies to provider 'auto' only; provider '{adapter.name}' always runs its own "
            "kernel: use attention_provider('auto', autotune=True) to choose among kernels by timing them"
        )
    return AUTO_TUNED


def _count_cp_context(delta: int) -> None:
    global open_cp_contexts
    with _OPEN_CP_LOCK:
        open_cp_contexts += delta


def make_call(
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sharded: bool = False
) -> AttentionCall:
    """Check the arguments as SDPA would (independent of provider) and resolve defaults.

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
    return AttentionCall(query, key, value, attn_mask, bool(is_causal), float(scale), float(dropout_p), enable_gqa)


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


def attention_dispatch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention` on the active provider.

    Inputs are (batch, heads, seq_len, head_dim). Under `attention_provider(..., cp_mesh=mesh)` with more
    than one rank they are this rank's sequence shard and so is the result. Under `torch.autocast` the inputs
    are cast as autocast casts SDPA's (see `_dispatch_under_autocast`).
    """
    if any_autocast_enabled():  # one C call on the hot path
        autocast = _autocast_for(query)
        if autocast is not None:
            return _dispatch_under_autocast(*autocast, query, key, value, attn_mask, dropout_p, is_causal, scale,
                                            enable_gqa)
    if torch.compiler.is_compiling():  # dynamo cannot read the ContextVar: one custom op in the graph
        if _needs_folding(query, key, value):
            return _dispatch_folded_to_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if is_mask_mod(attn_mask):
            raise InvalidArgumentError("a callable attn_mask (mask_mod) is not supported under torch.compile: "
                                       "pass a tensor mask, e.g. cpattn.masks.materialize_mask_mod(...)")
        return compiled_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    state = current_state()
    provider = state.provider
    if state.cp is not None and state.cp.world_size > 1:
        if _needs_folding(query, key, value):
            return _dispatch_folded_to_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        call = make_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sharded=True)
        return state.cp.run(provider, call)
    if attn_mask is not None and is_mask_mod(attn_mask):  # single device: positions are 0..S-1
        if _needs_folding(query, key, value):
            return _dispatch_folded_to_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        attn_mask = _single_device_mask(attn_mask, query, key)
    # Hot path: a call this provider already accepted skips every check (they depend only on the cache key) and
    # runs the function the provider made for it.
    cache_key = call_signature(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    run = provider.accepted_runner(cache_key)
    if run is not None:
        return run(query, key, value, attn_mask)
    if _needs_folding(query, key, value):  # never cached under its own key: such a call always comes here
        return _dispatch_folded_to_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    call = make_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    out = run_single(provider, call)
    if not provider.verdict_depends_on_values(call):
        provider.remember_accepted(cache_key, on_tensors_device(call.query, provider.runner(call)))
    return out


def _autocast_for(query) -> tuple[str, torch.dtype] | None:
    """(device type, autocast dtype) when autocast is on for the inputs' device type, else None."""
    if not isinstance(query, torch.Tensor):
        return None  # make_call raises the clear error
    device_type = query.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return device_type, torch.get_autocast_dtype(device_type)


def _dispatch_under_autocast(device_type, dtype, query, key, value, attn_mask, dropout_p, is_causal, scale,
                             enable_gqa) -> torch.Tensor:
    """What autocast does to F.scaled_dot_product_attention, which is on its lower-precision list: every
    floating-point tensor argument on that device type, float64 excepted, is cast to the autocast dtype (q, k, v
    and a float mask; a bool mask stays). The call then runs with autocast off for that device type, as under
    torch.amp.custom_fwd(cast_inputs=...): merges, log-sum-exp arithmetic and float64 references inside cpattn
    keep the precision they were written for instead of being cast behind its back. Gradients flow back through
    the casts to the inputs' dtypes."""
    def cast(t):
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type \
            and t.dtype is not torch.float64 and t.dtype is not dtype
        return t.to(dtype) if eligible else t

    with torch.autocast(device_type, enabled=False):
        return attention_dispatch(cast(query), cast(key), cast(value), cast(attn_mask), dropout_p, is_causal,
                                  scale, enable_gqa)


def _needs_folding(query, key, value) -> bool:
    """Inputs SDPA takes that providers do not: a rank other than 4, or 4-D batch sizes of 1 against B.

    Checked off the hot path (compile, CP, mask_mod and cache-miss branches): such a call is never cached
    under its own signature, and its folded form is."""
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)):
        return False  # make_call raises the clear error
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return True
    sizes = {query.shape[0], key.shape[0], value.shape[0]}
    return len(sizes) == 2 and 1 in sizes


def _dispatch_folded_to_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """SDPA takes (..., L, E) with any number of leading dims: (L, E), (N, L, E), (N, B, H, L, E), ...; the
    providers take (B, H, L, E). Fewer than 4 dims gain leading 1s; 4 or more fold every dim before the heads
    (-3) into one batch dim, after broadcasting those dims across query, key, value and a mask as SDPA does (a
    batch of 1 against a batch of B included). The result is unfolded to SDPA's output shape. Under context
    parallelism the sequence dim (-2) is the sharded one either way."""
    tensors = (query, key, value)
    for name, t in zip(("query", "key", "value"), tensors):
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise InvalidArgumentError(
                f"{name} must have at least 2 dims (..., seq_len, head_dim), got shape {tuple(t.shape)}")
    rank = max(t.dim() for t in tensors)  # SDPA's output has the largest input rank
    padded = [t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t for t in tensors]
    batch = torch.broadcast_shapes(*(t.shape[:-3] for t in padded))
    q, k, v = (t.expand(*batch, *t.shape[-3:]).reshape(-1, *t.shape[-3:]) for t in padded)
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() > 3:
        shape = torch.broadcast_shapes(attn_mask.shape, (*batch, 1, 1, 1))
        attn_mask = attn_mask.expand(shape).reshape(-1, *shape[-3:])
    out = attention_dispatch(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return out.reshape((*batch, *out.shape[1:])[-rank:])  # the padding's leading 1s go again


def _single_device_mask(mask_mod, query, key) -> torch.Tensor:
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dim() == key.dim() == 4):
        raise InvalidArgumentError("query and key must be 4-D tensors (batch, heads, seq_len, head_dim)")
    device = query.device
    return materialize_mask_mod(mask_mod, query.shape[0], query.shape[1], torch.arange(query.shape[2], device=device),
                                torch.arange(key.shape[2], device=device))


def call_signature(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> tuple | None:
    """Everything the argument checks and a provider's verdict depend on (shapes, dtypes, devices, flags, and
    whether deterministic algorithms are on: some backward kernels are refused then).

    One flat tuple of the values as given: building and hashing it is most of what a cached call costs, so
    nothing is normalised here (is_causal=1 and True, or dropout_p=0 and 0.0, hash and compare equal anyway).
    """
    tensor = torch.Tensor
    if not (isinstance(query, tensor) and isinstance(key, tensor) and isinstance(value, tensor)):
        return None  # never accepted: make_call raises the clear error
    if attn_mask is not None:
        attn_mask = (attn_mask.shape, attn_mask.dtype, attn_mask.device, attn_mask.requires_grad) \
            if isinstance(attn_mask, tensor) else type(attn_mask)
    return (
        query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype, query.device, key.device,
        value.device, attn_mask, dropout_p, is_causal, scale, enable_gqa,
        torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad),
        torch.are_deterministic_algorithms_enabled(),
    )


def on_tensors_device(query: torch.Tensor, run):
    """`run`, made to launch its kernels on `query`'s GPU when another GPU is current (as run_checked does).

    With one GPU the current device is always the tensors' one, so the runner is returned as it is and a
    cached call pays for no check."""
    if not query.is_cuda or torch.cuda.device_count() < 2:
        return run
    index = query.get_device()

    def run_on_tensors_device(q, k, v, mask):
        if torch._C._cuda_getDevice() != index:
            with torch.cuda.device(index):
                return run(q, k, v, mask)
        return run(q, k, v, mask)
    return run_on_tensors_device


def run_single(provider: Provider, call: AttentionCall) -> torch.Tensor:
    reasons = provider.reasons(call)
    if reasons:
        raise UnsupportedInputError(f"provider '{provider.name}'", reasons, suggest(call, provider.name))
    return run_checked(provider, call)


def run_checked(provider: Provider, call: AttentionCall) -> torch.Tensor:
    query = call.query
    # torch._C._cuda_getDevice is what torch.cuda.current_device returns after its initialisation checks; a CUDA
    # tensor exists, so CUDA is initialised, and this runs on every call (it is on the hot path).
    if query.is_cuda and query.get_device() != torch._C._cuda_getDevice():
        with torch.cuda.device(query.device):  # kernels launch on the tensors' GPU, not the current one
            return provider.attention(call)
    return provider.attention(call)


from .compiled import compiled_attention  # noqa: E402  (it imports this module)
