"""`attention_dispatch`, the drop-in for F.scaled_dot_product_attention.

One call: autocast casts (as SDPA's), the compile path (one custom op, cpattn.compiled), the context-parallel
path (the active schedule), else the single-device path, where a call whose signature the provider already
accepted runs the function the provider made for it without any check.
"""

from __future__ import annotations

import sys

import torch

from . import compiled, scoremods, state
from .call import call_signature, make_call
from .contract import AttentionCall, Provider, any_autocast_enabled, default_scale
from .errors import InvalidArgumentError, UnsupportedInputError
from .masks import is_mask_mod, materialize_mask_mod
from .providers import suggest
from .state import STATE_VAR, state_from_env

def attention_dispatch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window: "tuple[int | None, int | None] | None" = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    kv_replicated: bool = False,
) -> torch.Tensor:
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention` on the active provider.

    Inputs are (batch, heads, seq_len, head_dim). Under `attention_provider(..., cp_mesh=mesh)` with more
    than one rank they are this rank's sequence shard and so is the result. Under `torch.autocast` the inputs
    are cast as autocast casts SDPA's (see `_dispatch_under_autocast`).

    Score modifications (keyword-only; each combines with is_causal, masks, GQA and scale):
    * ``window=(left, right)``: query i sees key j iff i - left <= j <= i + right (ints >= 0, None: unbounded),
      aligned as is_causal aligns them (top-left); with is_causal the right side is 0.
    * ``softcap=c``: scores become c * tanh(scores / c) before masking and softmax.
    * ``sinks``: (query heads,) logits that join each row's softmax denominator and nothing else; differentiable.

    Cross-attention under context parallelism (sharded queries, key/value whole on every rank, e.g. text tokens):
    a key length that differs from the local query length means key/value are replicated; ``kv_replicated=True``
    says so where the lengths happen to coincide. No key/value moves between ranks; each rank's key/value
    gradient is its own share, completed by the usual gradient all-reduce of the parameters they come from.
    """
    if any_autocast_enabled():  # one C call on the hot path
        autocast = _autocast_for(query)
        if autocast is not None:
            return _dispatch_under_autocast(*autocast, query, key, value, attn_mask, dropout_p, is_causal, scale,
                                            enable_gqa, window=window, softcap=softcap, sinks=sinks,
                                            kv_replicated=kv_replicated)
    modified = window is not None or softcap is not None or sinks is not None
    if torch.compiler.is_compiling():  # dynamo cannot read the ContextVar: one custom op in the graph
        if _needs_folding(query, key, value):
            return _dispatch_folded_to_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                          window=window, softcap=softcap, sinks=sinks)
        if is_mask_mod(attn_mask):
            raise InvalidArgumentError("a callable attn_mask (mask_mod) is not supported under torch.compile: "
                                       "pass a tensor mask, e.g. cpattn.masks.materialize_mask_mod(...)")
        if modified or kv_replicated:  # the custom op has no such arguments: the eager path, between graphs
            return _THIS_MODULE.eager_dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                               enable_gqa, window=window, softcap=softcap, sinks=sinks,
                                               kv_replicated=kv_replicated)
        return _compiled_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    state = STATE_VAR.get() or state_from_env()  # current_state(), inline: this runs on every call
    provider = state.provider
    if state.cp is not None and state.cp.world_size > 1:
        if _needs_folding(query, key, value):
            return _dispatch_folded_to_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                          window=window, softcap=softcap, sinks=sinks, kv_replicated=kv_replicated)
        call = make_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, sharded=True,
                         window=window, softcap=softcap, sinks=sinks, kv_replicated=kv_replicated)
        return state.cp.run(provider, call, suggest)
    if attn_mask is not None and is_mask_mod(attn_mask):  # single device: positions are 0..S-1
        if _needs_folding(query, key, value):
            return _dispatch_folded_to_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                          window=window, softcap=softcap, sinks=sinks)
        attn_mask = _single_device_mask(attn_mask, query, key)
    if modified:  # checked on every call: the cached runners take no score modifications
        if _needs_folding(query, key, value):
            return _dispatch_folded_to_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                          window=window, softcap=softcap, sinks=sinks)
        return run_single(provider, make_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                              window=window, softcap=softcap, sinks=sinks))
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
                             enable_gqa, **mods) -> torch.Tensor:
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
                                  scale, enable_gqa, **mods)


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


def _dispatch_folded_to_4d(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, **mods):
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
    out = attention_dispatch(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, **mods)
    return out.reshape((*batch, *out.shape[1:])[-rank:])  # the padding's leading 1s go again


def _single_device_mask(mask_mod, query, key) -> torch.Tensor:
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and query.dim() == key.dim() == 4):
        raise InvalidArgumentError("query and key must be 4-D tensors (batch, heads, seq_len, head_dim)")
    device = query.device
    return materialize_mask_mod(mask_mod, query.shape[0], query.shape[1], torch.arange(query.shape[2], device=device),
                                torch.arange(key.shape[2], device=device))


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
            return scoremods.attention(provider, call)
    return scoremods.attention(provider, call)




def _compiled_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> torch.Tensor:
    """What `attention_dispatch` does while dynamo traces it: one `cpattn::attention_fwd` op in the graph, or,
    for what that op cannot take (context parallelism, dropout, a mask that requires grad), the eager path run
    between graphs (one graph break)."""
    if (state.open_cp_contexts > 0 or dropout_p > 0
            or (isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad)):
        return _THIS_MODULE.eager_dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if scale is None:
        scale = default_scale(query.shape[-1])
    needs_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return compiled.attention_fwd(query, key, value, attn_mask, float(dropout_p), bool(is_causal), float(scale),
                                  bool(enable_gqa), needs_grad)[0]


def __getattr__(name: str):
    # `torch.compiler.disable` imports torch._dynamo (about a second): wrap on first use, which is always while
    # dynamo traces (so it is loaded by then), never at `import cpattn`.
    if name == "eager_dispatch":
        fn = globals()["eager_dispatch"] = torch.compiler.disable(attention_dispatch)
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_THIS_MODULE = sys.modules[__name__]
