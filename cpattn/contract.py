"""The kernel contract every provider implements, and the one form its results take.

Layout: query, key, value and output are ``(B, H, S, D)``, the layout of ``F.scaled_dot_product_attention``
(the value head dim may differ from the query head dim). Query heads ``Hq`` are a multiple of key/value
heads ``Hkv`` (grouped-query attention); query head ``h`` reads KV head ``h // (Hq // Hkv)``.

Log-sum-exp: float32, natural log, shape ``(B, Hq, Sq)``, ``-inf`` on rows that see no key at all. A provider
converts whatever its kernel returns (base 2, ``+inf`` or ``0`` for empty rows, padded or trailing-1 shapes)
into this form at its boundary, so schedules and merges never know which kernel ran.

A provider is an adapter with three entry points:

* ``attention(call) -> out``: the single-device path. It may use the library's own autograd (fastest);
  by default it wraps ``forward``/``backward`` in an autograd function.
* ``forward(call) -> (out, lse)``: used by context-parallel schedules.
* ``backward(call, dout, out, lse) -> (dq, dk, dv)``: gradients of this block given the *global* output and
  log-sum-exp of the whole row (what ring backward hands it). Only where ``Capabilities.backward`` is set.
  They are new tensors the caller owns (any strides): the ring keeps dQ parts until it adds them, and a block's
  first dK/dV part as its running sum. ``forward``'s results are new tensors too: the ring keeps its blocks'
  outputs until it merges them.
* ``shared_rows_backward(call, dout, out, lse) -> SharedRowsBackward``: the backward of several blocks that share one rank's
  query rows (a ring backward's steps), dQ summed over them. By default it calls ``backward`` per block and adds
  the dQ parts; a provider whose kernel keeps its own float32 dQ accumulator may keep one across the blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from einops import reduce, repeat

from .ops import gradsum
from .ops.window import local_band_mask, window_band
from .errors import ProviderUnavailableError

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})


@dataclass(frozen=True)
class Capabilities:
    """What a provider can take on one device type. Every field is checked before a kernel runs."""

    dtypes: frozenset = FLOAT_DTYPES
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    min_compute_capability: tuple[int, int] | None = None
    causal: bool = True
    bool_mask: bool = False  # general boolean masks (True = attend)
    additive_mask: bool = False  # float masks added to the scores
    key_padding_mask: bool = False  # masks that only hide keys: shape (B or 1, 1, 1, Sk)
    mask_grad: bool = False  # gradients flow to a float attn_mask that requires grad (single-device path)
    varlen: bool = False  # packed sequences with cu_seqlens
    dropout: bool = False  # dropout_p > 0 on the single-device path
    gqa: bool = True  # Hq != Hkv (natively or by expanding KV heads inside the adapter)
    custom_scale: bool = True
    returns_lse: bool = True  # forward() gives the true natural-log LSE (ring needs it)
    backward: bool = False  # backward() with an externally supplied (out, lse) (ring backward needs it)
    training: bool = False  # gradients flow through attention() on the single-device path
    deterministic_backward: bool = True
    # forward()/backward() read row slices of (B, H, S, D) tensors as they are (strided views, no copy): a ring
    # then passes views of the rows it needs instead of making dense copies of them
    row_views: bool = False
    nested: bool = False  # jagged nested tensors (torch.nested, layout=torch.jagged) on the single-device path
    # Score modifications the kernel applies itself. A window it lacks is taken as an exact boolean mask where
    # it takes those (dense cost); sinks it lacks enter through its log-sum-exp where it returns one (and has a
    # backward, for gradients); a softcap it lacks cannot be emulated and is refused.
    window: bool = False  # sliding windows (left, right), skipping the work outside them
    softcap: bool = False
    sinks: bool = False
    notes: tuple[str, ...] = ()


@dataclass(slots=True)
class AttentionCall:
    """One attention problem, validated and with its scale resolved. Schedules build sub-calls from it."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None = None
    is_causal: bool = False
    scale: float = 1.0
    dropout_p: float = 0.0
    enable_gqa: bool = False
    # Score modifications (see `band` and cpattn/ops/sinks.py). `window` is (left, right) in this call's own
    # coordinates, top-left aligned: query i may see key j iff i - left <= j <= i + right; None on a side is
    # unbounded. A user's call has sides >= 0; a schedule's block call may have a negative side (the band of
    # a block off the diagonal), which `cpattn.ops.window.trim_block` turns into a block with sides >= 0.
    window: "tuple[int | None, int | None] | None" = None
    softcap: float | None = None  # scores become softcap * tanh(scores / softcap) before masking and softmax
    sinks: torch.Tensor | None = None  # (Hq,) logits that join each row's softmax denominator and nothing else
    # Under context parallelism: key/value are whole on every rank (cross-attention to text or encoder tokens)
    # while the queries are sharded. Implied where the key length differs from the local query length.
    kv_replicated: bool = False

    @property
    def batch(self) -> int:
        return self.query.shape[0]

    @property
    def q_heads(self) -> int:
        return self.query.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def groups(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def kv_len(self) -> int:
        return self.key.shape[2]

    @property
    def head_dim(self) -> int:
        return self.query.shape[3]

    @property
    def value_dim(self) -> int:
        return self.value.shape[3]

    @property
    def device(self) -> torch.device:
        return self.query.device

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.query.requires_grad or self.key.requires_grad
                                            or self.value.requires_grad)

    @property
    def mask_kind(self) -> str | None:
        if self.attn_mask is None:
            return None
        if not isinstance(self.attn_mask, torch.Tensor):
            return "mask_mod"  # a callable: made a bool tensor before any kernel sees it
        if self.attn_mask.dtype == torch.bool:
            return "key_padding" if is_key_padding_mask(self.attn_mask) else "bool"
        return "key_padding_additive" if is_key_padding_mask(self.attn_mask) else "additive"

    def replace(self, **changes) -> "AttentionCall":
        return dataclasses.replace(self, **changes)


@dataclass
class Availability:
    ok: bool
    version: str | None = None
    reason: str | None = None


class Provider:
    """Base class of provider adapters. Subclasses set the class attributes and implement the kernels."""

    name: ClassVar[str]
    family: ClassVar[str]
    package: ClassVar[str | None] = None  # pip distribution behind it, None for torch itself
    min_version: ClassVar[str | None] = None
    supports: ClassVar[dict[str, Capabilities]] = {}
    description: ClassVar[str] = ""

    def __init__(self) -> None:
        self._availability: Availability | None = None
        # Calls this provider already checked and accepted, keyed by dispatch.call_signature: the
        # availability they were accepted under and the function that runs them (see `runner`); bounded.
        self._accepted: dict[tuple, tuple[Availability | None, Callable]] = {}

    def accepted_runner(self, key: tuple) -> Callable | None:
        """The runner of a call with this key, if one was checked and accepted under the current availability."""
        entry = self._accepted.get(key)
        if entry is not None and entry[0] is self._availability:
            return entry[1]
        return None

    def remember_accepted(self, key: tuple, run: Callable) -> None:
        """Keep `run` (made by `runner` for an accepted call) for later calls with this key."""
        if len(self._accepted) >= 4096:
            self._accepted.clear()
        self._accepted[key] = (self._availability, run)

    def verdict_depends_on_values(self, call: AttentionCall) -> bool:
        """Whether `reasons(call)` reads tensor values, not only what dispatch.call_signature holds (shapes,
        dtypes, flags). Dispatch then checks every such call again instead of caching a runner for its signature:
        a runner cached for one mask would otherwise serve another mask of the same shape that must be refused."""
        return False

    def runner(self, call: AttentionCall) -> Callable:
        """A function of (query, key, value, attn_mask) that does what `attention` does for `call` and for every
        call that differs from it only in tensor values (same dispatch.call_signature).

        This default rebuilds the call; providers whose kernel needs nothing computed per call return the bare
        kernel call instead, so a cached shape pays for no Python beyond the signature."""
        causal, scale, dropout_p, gqa, attention = call.is_causal, call.scale, call.dropout_p, call.enable_gqa, \
            self.attention

        window, softcap = call.window, call.softcap  # calls with sinks are never cached (see dispatch)

        def run(query, key, value, attn_mask):
            return attention(AttentionCall(query, key, value, attn_mask, causal, scale, dropout_p, gqa, window, softcap))
        return run

    # -- availability -------------------------------------------------------------------------
    def availability(self) -> Availability:
        """Whether the library loads; computed once (imports are lazy so `import cpattn` never breaks)."""
        if self._availability is None:
            try:
                self._availability = self._probe()
            except Exception as exc:  # a broken library must not break cpattn
                self._availability = Availability(False, None, f"{type(exc).__name__}: {exc}")
        return self._availability

    def _probe(self) -> Availability:
        return Availability(True, torch.__version__)

    def require_available(self) -> None:
        avail = self.availability()
        if not avail.ok:
            raise ProviderUnavailableError(f"provider '{self.name}' is not available: {avail.reason}")

    def capabilities(self, device_type: str) -> Capabilities | None:
        return self.supports.get(device_type)

    # -- input checks -------------------------------------------------------------------------
    def reasons(self, call: AttentionCall, *, need_lse: bool = False, need_backward: bool = False) -> list[str]:
        """Every reason, in words, why this provider cannot take `call` (empty list: it can)."""
        avail = self.availability()
        if not avail.ok:
            return [f"its library is not usable here: {avail.reason}"]
        caps = self.capabilities(call.device.type)
        if caps is None:
            return [f"it runs on {', '.join(sorted(self.supports))} only, the inputs are on {call.device.type}"]
        out = capability_reasons(caps, call)
        if caps.min_compute_capability and call.device.type == "cuda":
            have = device_capability(call.device)
            if have < caps.min_compute_capability:
                need = "sm%d%d" % caps.min_compute_capability
                out.append(f"it needs a GPU of compute capability {need} or newer, this one is sm{have[0]}{have[1]}")
        if call.needs_grad and not caps.training:
            out.append("gradients were requested but it has no backward kernel (forward/inference only)")
        if need_lse and not caps.returns_lse:
            out.append("it returns no log-sum-exp, which ring attention needs to merge partial results")
        if need_backward and call.needs_grad and not caps.backward:
            out.append("it has no backward that takes an external (out, lse), which ring backward needs")
        out += self.extra_reasons(call, caps)
        return out

    def extra_reasons(self, call: AttentionCall, caps: Capabilities) -> list[str]:
        """Provider-specific limits not expressible as capabilities."""
        return []

    # -- kernels ------------------------------------------------------------------------------
    def attention(self, call: AttentionCall) -> torch.Tensor:
        """Single-device attention with autograd; default: forward/backward of the contract."""
        caps = self.capabilities(call.device.type)
        if call.needs_grad and caps is not None and caps.backward:
            return ContractAttentionFunction.apply(self, call, call.query, call.key, call.value)
        with torch.no_grad():
            return self.forward(call)[0]

    def forward(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward(
        self, call: AttentionCall, dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"provider '{self.name}' has no backward kernel")

    def shared_rows_backward(self, call: AttentionCall, dout: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor) -> "SharedRowsBackward":
        """The backward of blocks that all take `call`'s query rows or some of them, given those rows' global
        `dout`, `out` and `lse` (see SharedRowsBackward). This default calls `backward` once per block."""
        return SharedRowsBackward(self, call)

    def __repr__(self) -> str:
        return f"<provider {self.name}>"


# One C call; torch releases without it check the device type each time.
any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_off(device: torch.device):
    """Autocast off for `device`'s type while cpattn computes, when it is on: a backward() called inside an
    autocast block would otherwise cast its kernels' and merges' float32 arithmetic; no context otherwise."""
    if any_autocast_enabled() and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def device_capability(device: torch.device) -> tuple[int, int]:
    """A CUDA device's compute capability, read once per device: providers ask for it on every call (a ring on
    every step), and torch.cuda.get_device_capability goes through device lookups each time."""
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def on_device(device: torch.device):
    """Make `device` the current CUDA device inside the block (libraries launch on the current one); nothing to
    do, and no context switch to pay, when it already is or the tensors are not on CUDA."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


class ContractAttentionFunction(torch.autograd.Function):
    """Autograd over a provider's forward/backward, for providers whose library has no autograd of its own."""

    @staticmethod
    def forward(ctx, provider, call, query, key, value):
        out, lse = provider.forward(call.replace(query=query, key=key, value=value))
        ctx.provider, ctx.call = provider, call
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        query, key, value, out, lse = ctx.saved_tensors
        call = ctx.call.replace(query=query, key=key, value=value)
        with autocast_off(query.device):
            dq, dk, dv = ctx.provider.backward(call, dout.contiguous(), out, lse)
        return None, None, dq, dk, dv


def capability_reasons(caps: Capabilities, call: AttentionCall) -> list[str]:
    out = []
    if not caps.nested and (call.query.is_nested or call.key.is_nested or call.value.is_nested):
        out.append("nested (jagged) tensors are not supported: it takes dense (B, H, S, D) tensors; use provider "
                   "'native' (PyTorch SDPA takes them), or pack the sequences and call cpattn.flash_varlen_attention")
    if call.dtype not in caps.dtypes:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in caps.dtypes))
        out.append(f"dtype {str(call.dtype).replace('torch.', '')} is not supported (supported: {names})")
    for dim, what in ((call.head_dim, "query/key"), (call.value_dim, "value")):
        if caps.max_head_dim is not None and dim > caps.max_head_dim:
            out.append(f"{what} head dim {dim} exceeds its maximum {caps.max_head_dim}")
        if dim % caps.head_dim_multiple:
            out.append(f"{what} head dim {dim} is not a multiple of {caps.head_dim_multiple}")
    if call.is_causal and not caps.causal:
        out.append("is_causal=True is not supported")
    kind = call.mask_kind
    if kind in ("bool", "mask_mod") and not caps.bool_mask:
        out.append("a boolean attn_mask is not supported" + _mask_hint(caps))
    if kind == "additive" and not caps.additive_mask:
        out.append("an additive (float) attn_mask is not supported" + _mask_hint(caps))
    if kind == "key_padding" and not (caps.key_padding_mask or caps.bool_mask):
        out.append("attn_mask (a key-padding mask) is not supported" + _mask_hint(caps))
    if kind == "key_padding_additive" and not caps.additive_mask:
        out.append("an additive attn_mask is not supported; pass key padding as a bool mask" + _mask_hint(caps))
    mask = call.attn_mask
    if isinstance(mask, torch.Tensor) and mask.requires_grad and torch.is_grad_enabled() and not caps.mask_grad:
        out.append("gradients with respect to attn_mask are not supported (only provider 'native' has them)")
    if call.dropout_p > 0 and not caps.dropout:
        out.append(f"dropout_p={call.dropout_p} is not supported")
    if call.q_heads != call.kv_heads and not caps.gqa:
        out.append(f"query heads ({call.q_heads}) != key/value heads ({call.kv_heads}) (GQA) is not supported")
    return out + structure_reasons(caps, call)


def structure_reasons(caps: Capabilities, call: AttentionCall) -> list[str]:
    """Why the provider cannot apply the call's window, softcap or sinks, natively or through the exact routes
    (a window as a boolean mask, sinks through the log-sum-exp)."""
    out = []
    if call.window is not None and not caps.window and not caps.bool_mask:
        out.append(f"window={call.window} is not supported: it has neither a window nor a boolean mask; use "
                   "provider 'flash' (FlashAttention 2/3/4) or 'flex', which skip the work outside the window")
    if call.softcap is not None and not caps.softcap:
        out.append(f"softcap={call.softcap} is not supported (a softcap changes every score and no mask expresses "
                   "it); use provider 'flash', 'flex' or '_native_math'")
    if call.sinks is not None and not caps.sinks:
        if not caps.returns_lse:
            out.append("sinks are not supported: it has no sink argument and returns no log-sum-exp to add them "
                       "through; use provider 'flash' or any provider that returns one (e.g. 'native', 'flex')")
        elif call.needs_grad and not caps.backward:
            out.append("sinks with gradients are not supported: it has no sink argument and no backward that takes "
                       "an external (out, lse); use provider 'flash' or 'native'")
    return out


def band(call: AttentionCall) -> "tuple[int | None, int | None] | None":
    """The (left, right) band of key offsets j - i in [-left, right] that `call` may attend, its window and
    is_causal (top-left: right <= 0) together; None when neither limits it."""
    return window_band(call.window, call.is_causal)


def _mask_hint(caps: Capabilities) -> str:
    if caps.key_padding_mask and not caps.bool_mask:
        return " (only key-padding masks of shape (B, 1, 1, Sk))"
    return ""


def is_key_padding_mask(mask: torch.Tensor) -> bool:
    """A 4-D mask that varies only along batch and key: it hides keys, never shapes rows differently."""
    return mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# -- helpers shared by adapters ----------------------------------------------------------------------


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Repeat each KV head `groups` times so a kernel without GQA sees Hq heads (query head h -> KV h // g)."""
    if groups == 1:
        return x
    return repeat(x, "b h s d -> b (h g) s d", g=groups)


def reduce_kv_grad(dx: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of `expand_kv` for gradients: sum the copies of each KV head."""
    if groups == 1:
        return dx
    return reduce(dx, "b (h g) s d -> b h s d", "sum", g=groups)


class SharedRowsBackward:
    """Gradients of attention blocks that share one rank's query rows: a ring backward's steps, each against
    another KV block. `block` returns a block's dK/dV as soon as it is computed (they travel to the block's
    owner); dQ is summed over the blocks and asked for once, by `dq`.

    This default runs the provider's `backward` per block and keeps the dQ parts for one float32 sum
    (gradsum.DeferredRowSum). A provider whose kernel sums dQ in a float32 accumulator of its own can subclass it to keep
    one accumulator over all the blocks, so that the work the kernel does per call around that accumulator (clear
    it, prepare the rows, round it to dQ) is done once per rank instead of once per block."""

    def __init__(self, provider: "Provider", call: AttentionCall) -> None:
        self._provider = provider
        self._dq = gradsum.DeferredRowSum(call.query.shape, call.device)

    def block(self, call: AttentionCall, rows: slice, dout: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dK, dV) of one block: `call` holds the query `rows` of the shared rows against one KV block; `dout`,
        `out` and `lse` are those rows' (global) values."""
        dq, dk, dv = self._provider.backward(call, dout, out, lse)
        self._dq.add(rows, dq)
        return dk, dv

    def dq(self, dtype: torch.dtype) -> torch.Tensor:
        """dQ of the shared rows summed over every block, in `dtype`, rounded once (zeros after no block)."""
        return self._dq.result(dtype)


def normalize_lse(
    lse: torch.Tensor, q_len: int, *, empty_rows: torch.Tensor | None = None, base2: bool = False,
    may_be_empty: bool = True,
) -> torch.Tensor:
    """Bring a kernel's log-sum-exp into the contract's form: float32 (B, H, Sq), natural log, -inf if empty.

    Handles trailing-1 shapes (cuDNN), sequence padding (memory-efficient kernels), base-2 values, and the
    empty-row conventions: +inf (flash-attn) becomes -inf; kernels that write 0 for empty rows pass
    `empty_rows` (a boolean broadcastable to (B, H, Sq)) computed from the mask. `may_be_empty=False`
    (see `rows_may_be_empty`) skips the +inf fix-up: two kernel launches per call, which a ring pays per block.
    """
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse.squeeze(-1)
    if lse.shape[-1] != q_len:
        lse = lse[..., :q_len]
    lse = lse.float()
    if base2:
        lse = lse * math.log(2.0)
    if may_be_empty:
        lse = torch.where(torch.isposinf(lse), float("-inf"), lse)
    if empty_rows is not None:
        lse = lse.masked_fill(empty_rows, float("-inf"))
    return lse


def lse_for_kernel_backward(lse: torch.Tensor, may_be_empty: bool = True) -> torch.Tensor:
    """Empty rows as +inf so that exp(score - lse) is 0 for every score, finite or not, in backward kernels.
    With `may_be_empty=False` (see `rows_may_be_empty`) there are none and `lse` is returned as it is."""
    if not may_be_empty:
        return lse
    return torch.where(torch.isneginf(lse), float("inf"), lse)


def rows_may_be_empty(call: AttentionCall) -> bool:
    """Whether some query row of `call` can see no key at all: under a mask, with no key, or under a band that
    misses some row. Causal attention is top-left aligned, so its row i always sees key 0."""
    return call.attn_mask is not None or call.kv_len == 0 or (call.window is not None and _band_misses_rows(call))


def _band_misses_rows(call: AttentionCall) -> bool:
    left, right = band(call)
    if right is not None and right < 0:
        return True
    return left is not None and call.q_len > call.kv_len + left


def empty_query_rows(call: AttentionCall) -> torch.Tensor | None:
    """Rows (B?, H?, Sq) with no key to attend to, from the mask and the window (causal top-left alone never
    empties a row)."""
    mask = call.attn_mask
    if mask is None and not (call.window is not None and _band_misses_rows(call)):
        return None
    allowed = None if mask is None else (mask if mask.dtype == torch.bool else mask > float("-inf"))
    if band(call) is not None:
        in_band = local_band_mask(call.q_len, call.kv_len, band(call), call.device)
        allowed = in_band if allowed is None else allowed & in_band
    rows = ~allowed.any(dim=-1)
    return rows if bool(rows.any()) else None


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Top-left aligned causal mask, as F.scaled_dot_product_attention defines is_causal."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
