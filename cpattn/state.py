"""Per-call state: which provider `attention_dispatch` runs on, and the context-parallel setup, for the code
inside an `attention_provider(...)` block.

The state lives in a ContextVar: nesting restores the previous state, and threads and asyncio tasks each see
their own. With no block open the provider comes from the environment variable CPATTN_PROVIDER, else `native`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

from .contract import Provider
from .cp import ContextParallel
from .errors import InvalidArgumentError, NoAttentionCallError
from .names import AttentionProvider
from .providers import AUTO, AUTO_TUNED, get_provider

ENV_PROVIDER = "CPATTN_PROVIDER"
CP_OPTIONS = {
    "cp_strategy": ("auto", "ring", "ulysses", "hybrid", "allgather"),
    "cp_layout": ("zigzag", "contiguous"),
    "cp_timeout": None,  # seconds a rank waits for a peer before raising (default 60; given: bounded on NCCL too)
    "cp_replicated_prefix": None,  # tokens at the start of q/k/v that every rank holds whole (joint attention)
    "cp_replicated_suffix": None,  # tokens at the end of q/k/v that every rank holds whole (SD3's joint attention)
    "cp_ring_streams": (2, 1),  # CUDA streams a ring backward's steps take in turn (cpattn/cp/streams.py)
    "cp_require_attention": (True, False),  # a multi-rank block that makes no attention call raises on exit
}
PROVIDER_OPTIONS = {
    "autotune": (False, True),  # provider "auto" only: choose per input signature by timing the candidates
}


@dataclass(frozen=True)
class DispatchState:
    provider: Provider
    cp: Any = None  # cpattn.cp.ContextParallel, or None for single-device dispatch
    options: dict = field(default_factory=dict)


STATE_VAR: contextvars.ContextVar[DispatchState | None] = contextvars.ContextVar("cpattn_state", default=None)
# attention_provider blocks with a multi-rank cp_mesh open right now (all threads). torch.compile cannot read the
# ContextVar; it guards on this count instead to trace CP calls eagerly (see cpattn/compiled.py).
open_cp_contexts = 0
_OPEN_CP_LOCK = threading.Lock()
_ENV_STATES: dict = {}  # the environment variable's raw value -> its DispatchState (a cache, never a setting)


def _raw_environ():
    """os.environ's underlying mapping and the variable's key in it: a call outside any block reads the variable
    every time (so setting it later takes effect), and `os.environ.get` encodes the name and decodes the value on
    each read, several times what the lookup itself costs. Where the mapping is not exposed, os.environ itself."""
    data, encode = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
    if isinstance(data, dict) and callable(encode):
        return data, encode(ENV_PROVIDER)
    return os.environ, ENV_PROVIDER


_ENVIRON, _ENV_KEY = _raw_environ()


def state_from_env() -> DispatchState:
    raw = _ENVIRON.get(_ENV_KEY)
    state = _ENV_STATES.get(raw)
    if state is None:
        state = _ENV_STATES[raw] = _env_state(raw)
    return state


def _env_state(raw) -> DispatchState:
    name = (raw.decode() if isinstance(raw, bytes) else raw) or "native"
    try:
        provider = get_provider(name)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(f"environment variable {ENV_PROVIDER}={name!r} is invalid: {exc}") from None
    return DispatchState(provider)


def current_state() -> DispatchState:
    state = STATE_VAR.get()
    return state if state is not None else state_from_env()


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
        if key in ("cp_replicated_prefix", "cp_replicated_suffix") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidArgumentError(f"option {key}={value!r} must be a token count >= 0")
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
    cp_replicated_prefix, cp_replicated_suffix, cp_ring_streams (2, the default, or 1: see cpattn/cp/streams.py); and autotune=True
    with provider "auto" (see cpattn.providers.auto).
    """
    adapter = get_provider(provider)
    opts = _validate_options(options)
    require_calls = opts.pop("cp_require_attention", True)
    if opts.pop("autotune", False):
        adapter = _autotuned(adapter)
    cp = None
    if cp_mesh is not None:
        cp = ContextParallel.from_mesh(cp_mesh, **opts)
    elif any(k.startswith("cp_") for k in opts):
        raise InvalidArgumentError(f"options {sorted(opts)} need cp_mesh to be given")
    state = DispatchState(adapter, cp, opts)
    multi_rank = cp is not None and cp.world_size > 1
    if multi_rank:
        _count_cp_context(+1)
    token = STATE_VAR.set(state)
    try:
        yield state
    finally:
        STATE_VAR.reset(token)
        if multi_rank:
            _count_cp_context(-1)
    if multi_rank and require_calls and not cp.stats["calls"]:
        raise NoAttentionCallError(
            f"the attention_provider('{adapter.name}', cp_mesh=...) block over {cp.world_size} ranks ended without "
            "any attention call reaching cpattn: the model ran its own attention (eager, or another kernel) on "
            "this rank's shard alone, so its results are wrong under context parallelism. Route the model's "
            "attention through cpattn (transformers: attn_implementation='cpattn' after importing "
            "cpattn.integrations.transformers; diffusers: cpattn.integrations.diffusers.parallelize; SDPA calls: "
            "cpattn.sdpa_patched()), or pass "
            "cp_require_attention=False for a block that makes no attention call on purpose.")


def _autotuned(adapter: Provider) -> Provider:
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
