"""PyTorch FlexAttention (`flex`): `torch.nn.attention.flex_attention.flex_attention` behind the kernel contract.

Masks and score modifications become flex's two hooks:

* structure that hides keys (``is_causal``, a ``window``, a boolean ``attn_mask``, together) becomes a
  ``mask_mod``, built into a ``BlockMask`` so the kernel skips blocks that are fully hidden: a sliding window
  costs the blocks it touches, not the whole score matrix. Block masks are cached per adapter instance (a small
  LRU), so a model that passes the same mask every layer builds it once;
* a ``softcap`` and an additive (float) ``attn_mask`` become a ``score_mod``: c * tanh(score / c), then the
  bias added (the softcap comes first, as the reference orders them);
* sinks are not a hook: they enter through the log-sum-exp flex returns (cpattn/scoremods.py).

Devices. On CUDA every call goes through ``torch.compile(flex_attention)`` (compiled lazily, once per
adapter): uncompiled flex materialises the whole score matrix. Each variant (grad mode, mask kind, dtype,
scale) is one compiled graph, so the adapter raises dynamo's recompile limit for its own compile (past the
limit dynamo silently falls back to the unfused eager flex), and retries with smaller tiles where the
default tiles of a variant overflow shared memory. Gradients on the single-device path come from flex's own
fused backward. On CPU flex runs eagerly and forward only: PyTorch has no flex backward there, so the CPU
capabilities say ``training=False, backward=False``.

Backward with an external (out, lse). Ring attention hands a block the *merged* output and log-sum-exp of
the whole row. Flex has no kernel that takes them, but its log-sum-exp output is differentiable (the
default Triton backend folds dL/dlse into its backward; the experimental ``BACKEND="FLASH"`` does not, so
this adapter never selects it). `recompute_block_grads` reruns the block's forward with autograd and feeds
it the gradients that the merge passes to the block's own (out, lse), which gives exactly the block's share
of the global gradients. Cost: one extra forward of the block per backward.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections import OrderedDict
from typing import Callable, Hashable

import torch

from .. import scoremods
from ..contract import AttentionCall, Availability, Capabilities, Provider, band, normalize_lse
from ..errors import ProviderUnavailableError, UnsupportedInputError
from ..masks import expand_to_4d
from .native import NativeMath

_EXACT = NativeMath()

BLOCK_MASK_CACHE_SIZE = 16
# Smaller tiles for variants whose default tiles overflow shared memory (fallback, see Flex._flex).
SMALL_TILES = {"BLOCK_M": 64, "BLOCK_N": 64}
RECOMPILE_LIMIT = 64  # compiled graphs of flex per adapter before dynamo falls back to eager (see compile_flex)
# Triton's tl.dot needs tiles of at least 16 along the head dim: the compiled CUDA kernel rejects smaller.
MIN_CUDA_HEAD_DIM = 16
WINDOW_NOTE = "window in its BlockMask: key blocks outside the window are skipped, not masked"
CPU_NO_BACKWARD = (
    "flex_attention has no backward on CPU (PyTorch runs it forward-only there): "
    "run it on CUDA, or use provider 'native' for gradients on CPU"
)
CPU_NO_BACKWARD_SOFTCAP = CPU_NO_BACKWARD.replace("'native'", "'_native_math'") + " (softcap included)"


# -- masks as flex hooks -------------------------------------------------------------------------------


def causal_mask_mod(b, h, q_idx, kv_idx):
    """Top-left aligned causal, as F.scaled_dot_product_attention defines is_causal."""
    return kv_idx <= q_idx


def _broadcast_reader(mask: torch.Tensor) -> Callable:
    """A function (b, h, q_idx, kv_idx) -> mask element that honours SDPA broadcasting.

    Dims of size 1 are dropped up front (so one entry serves every index there) and the remaining dims are
    indexed with their own index; this reads the (B?, H?, Sq?, Sk?) mask without expanding it in memory.
    """
    mask = expand_to_4d(mask)
    kept = tuple(dim for dim, size in enumerate(mask.shape) if size > 1)
    squeezed = mask[tuple(slice(None) if dim in kept else 0 for dim in range(4))]
    if not kept:  # a single value for every (b, h, q, kv): indexing with no index is not traceable

        def read_scalar(b, h, q_idx, kv_idx):
            return squeezed

        return read_scalar

    def read(b, h, q_idx, kv_idx):
        index = (b, h, q_idx, kv_idx)
        return squeezed[tuple(index[dim] for dim in kept)]

    return read


def bool_mask_mod(mask: torch.Tensor) -> Callable:
    """mask_mod of a boolean attn_mask (True = attend)."""
    read = _broadcast_reader(mask)

    def mask_mod(b, h, q_idx, kv_idx):
        return read(b, h, q_idx, kv_idx)

    return mask_mod


def bias_score_mod(bias: torch.Tensor) -> Callable:
    """score_mod that adds an additive (float) attn_mask to each score (-inf hides the key)."""
    read = _broadcast_reader(bias)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + read(b, h, q_idx, kv_idx)

    return score_mod


def softcap_score_mod(softcap: torch.Tensor) -> Callable:
    """score_mod of a softcap (a 0-d tensor, see `softcap_tensor`): scores become softcap * tanh(score / softcap)."""

    def capped(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return capped


@functools.lru_cache(maxsize=64)
def softcap_tensor(softcap: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The softcap as a 0-d tensor on the inputs' device, made once per value. A Python float in the score_mod
    is what dynamo turns into a CPU scalar input once it recompiles (another shape): the compiled CUDA kernel then
    fails ("all unwrapped values must be FakeTensor", "unbacked_bindings" with torch 2.11 on an H100). A tensor
    is one more buffer of the hook, and every softcap value runs the same compiled graph."""
    return torch.tensor(softcap, device=device, dtype=dtype)


def score_mod_for(call: AttentionCall) -> Callable | None:
    """The score_mod of a call: a softcap, an additive mask, or the softcap and then the bias (None: neither).

    The bias is read in the inputs' dtype, as SDPA adds it: a float32 bias tile for bfloat16 inputs of head
    dim 64 overflows the shared memory of the compiled kernel on H100 (seen with torch 2.11).
    """
    mask = call.attn_mask
    bias = None if mask is None or mask.dtype == torch.bool else bias_score_mod(mask.to(call.dtype))
    if call.softcap is None:
        return bias
    # float64 inputs (CPU) keep the softcap in float64; the kernels' scores are float32 otherwise
    dtype = torch.float64 if call.dtype == torch.float64 else torch.float32
    capped = softcap_score_mod(softcap_tensor(call.softcap, call.device, dtype))
    if bias is None:
        return capped

    def capped_then_bias(score, b, h, q_idx, kv_idx):
        return bias(capped(score, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx)

    return capped_then_bias


def band_mask_mod(left: int | None, right: int | None) -> Callable:
    """mask_mod of a band in the call's own top-left coordinates: query i sees key j iff i - left <= j <= i + right
    (None: unbounded on that side). (None, 0) is causal itself, kept as one function so its BlockMask is the
    causal one."""
    if left is None and right == 0:
        return causal_mask_mod
    if left is None:
        return lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + right
    if right is None:
        return lambda b, h, q_idx, kv_idx: kv_idx >= q_idx - left

    def in_band(b, h, q_idx, kv_idx):
        return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)

    return in_band


def mask_mod_for(mask: torch.Tensor | None, limits: "tuple[int | None, int | None] | None") -> Callable | None:
    """The mask_mod of the structure that hides keys: a boolean mask, a band (causality and the window, see
    cpattn.contract.band), or both (None: nothing hidden)."""
    in_band = None if limits is None else band_mask_mod(*limits)
    if mask is None:
        return in_band
    allowed = bool_mask_mod(mask)
    if in_band is None:
        return allowed

    def allowed_and_in_band(b, h, q_idx, kv_idx):
        return allowed(b, h, q_idx, kv_idx) & in_band(b, h, q_idx, kv_idx)

    return allowed_and_in_band


def block_structure(call: AttentionCall) -> tuple[torch.Tensor | None, "tuple[int | None, int | None] | None"]:
    """What goes into the BlockMask: the boolean attn_mask (if any) and the band of causality and the window."""
    mask = call.attn_mask
    return (mask if mask is not None and mask.dtype == torch.bool else None), band(call)


def build_block_mask(mask_mod: Callable, batch: int | None, heads: int | None, q_len: int, kv_len: int, device):
    """torch's create_block_mask (kept as a module function so tests can count the builds)."""
    from torch.nn.attention.flex_attention import create_block_mask

    # Lengths need not be multiples of the 128 block size: create_block_mask pads the last block and the
    # kernels bound the indices they pass to mask_mod, so mask_mod never reads past the mask.
    return create_block_mask(mask_mod, batch, heads, q_len, kv_len, device=device)


def _mask_dims(mask: torch.Tensor | None) -> tuple[int | None, int | None]:
    """Batch and head sizes of the BlockMask: those of the mask, None (broadcast) where it has size 1."""
    if mask is None:
        return None, None
    b, h = expand_to_4d(mask).shape[:2]
    return (b if b > 1 else None), (h if h > 1 else None)


class BlockMaskCache:
    """A small LRU of BlockMasks, keyed by what determines them: mask identity and version, the band (causal and
    the window), lengths, device. Each entry keeps its mask alive, so the id in its key cannot be reused by another tensor while the
    entry exists; the version counter makes an in-place edit of the mask a miss.
    """

    def __init__(self, capacity: int = BLOCK_MASK_CACHE_SIZE):
        self.capacity = capacity
        self.hits = 0
        self.builds = 0
        self._entries: OrderedDict[Hashable, tuple[torch.Tensor | None, object]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(mask: torch.Tensor | None, limits: "tuple[int | None, int | None] | None", q_len: int, kv_len: int,
            device) -> Hashable | None:
        """The cache key, or None where the mask cannot be tracked (inference tensors have no version)."""
        if mask is None:
            return (None, limits, q_len, kv_len, torch.device(device))
        try:
            version = mask._version
        except RuntimeError:  # "Inference tensors do not track version counter": never reuse blindly
            return None
        return (id(mask), version, tuple(mask.shape), limits, q_len, kv_len, torch.device(device))

    def get_or_build(self, key: Hashable | None, mask: torch.Tensor | None, build: Callable[[], object]):
        if key is None:
            self.builds += 1
            return build()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[1]
        block_mask = build()  # outside the lock: building evaluates mask_mod over the whole (Sq, Sk) grid
        with self._lock:
            self.builds += 1
            self._entries[key] = (mask, block_mask)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return block_mask

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# -- backward with an external (out, lse) -----------------------------------------------------------


def block_output_grads(
    dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients that reach a block's own (out, lse) through the merge into the global (out, lse).

    The merged row is out = sum_b w_b * o_b with w_b = exp(lse_b - lse) and lse = logsumexp_b(lse_b), so
        dL/do_b   = w_b * dout
        dL/dlse_b = w_b * sum_d(dout * (o_b - out))
    Rows the block does not reach (lse_b = -inf), or that no block reaches, get weight 0.
    """
    acc = torch.float64 if torch.float64 in (dout.dtype, block_lse.dtype) else torch.float32
    lse_b, lse_g = block_lse.to(acc), lse.to(acc)
    unreached = torch.isneginf(lse_b) | torch.isneginf(lse_g)  # -inf - -inf would be nan
    weight = torch.exp((lse_b - lse_g).masked_fill(unreached, float("-inf")))
    dout_a = dout.to(acc)
    grad_out = weight.unsqueeze(-1) * dout_a
    grad_lse = weight * (dout_a * (block_out.to(acc) - out.to(acc))).sum(dim=-1)
    return grad_out.to(block_out.dtype), grad_lse.to(block_lse.dtype)


def recompute_block_grads(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    call: AttentionCall,
    dout: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one block given the global (out, lse), by recomputing the block with autograd.

    `fn(q, k, v) -> (o_b, lse_b)` must be differentiable in both outputs, with lse_b the natural-log
    log-sum-exp of the block. Works for any such fn: flex on CUDA, or a pure-torch attention in tests.
    """
    q, k, v = (t.detach().requires_grad_(True) for t in (call.query, call.key, call.value))
    with torch.enable_grad():
        block_out, block_lse = fn(q, k, v)
    grad_out, grad_lse = block_output_grads(dout, out, lse, block_out.detach(), block_lse.detach())
    grads = torch.autograd.grad((block_out, block_lse), (q, k, v), (grad_out, grad_lse), allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (q, k, v)))


# -- the adapter --------------------------------------------------------------------------------------------


def _detached(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Flex refuses CPU inputs that require grad even under no_grad; the contract's forward never needs a graph.
    return call.query.detach(), call.key.detach(), call.value.detach()


def _tile_variant(call: AttentionCall) -> tuple:
    """What decides the compiled kernel's shared-memory needs (shapes along the sequence do not)."""
    return (call.device, call.dtype, call.head_dim, call.value_dim, call.mask_kind, call.is_causal,
            call.window is not None, call.softcap is not None)


def _is_out_of_shared_memory(exc: BaseException) -> bool:
    return "out of resource" in str(exc)


def _compile_failure(call: AttentionCall, exc: BaseException) -> ProviderUnavailableError:
    return ProviderUnavailableError(
        f"provider 'flex': torch.compile(flex_attention) failed on {call.device} "
        f"({type(exc).__name__}: {_first_line(exc)}). "
        "Compiled flex needs a working Triton/inductor; provider 'native' takes the same call"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _is_compile_error(exc: BaseException) -> bool:
    dynamo_exc = getattr(getattr(torch, "_dynamo", None), "exc", None)
    return dynamo_exc is not None and isinstance(exc, dynamo_exc.TorchDynamoException)


class Flex(Provider):
    """torch.nn.attention.flex_attention: causal, windows, boolean and additive masks and softcaps as
    mask_mod/score_mod, native GQA."""

    name = "flex"
    family = "flex"
    description = "PyTorch FlexAttention (torch.compile'd Triton kernel on CUDA, forward-only on CPU)"
    supports = {
        "cpu": Capabilities(
            dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
            bool_mask=True, additive_mask=True, key_padding_mask=True, returns_lse=True,
            backward=False, training=False, window=True, softcap=True,
            notes=("CPU flex has no backward", WINDOW_NOTE),
        ),
        "cuda": Capabilities(
            dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
            bool_mask=True, additive_mask=True, key_padding_mask=True, returns_lse=True,
            backward=True, training=True, dropout=False, window=True, softcap=True,
            notes=(
                "runs torch.compile(flex_attention); the first call of each shape compiles",
                WINDOW_NOTE,
                "backward with an external (out, lse) recomputes the block's forward (one extra forward)",
                f"head dims below {MIN_CUDA_HEAD_DIM} are not supported by the Triton kernel",
            ),
        ),
    }

    def __init__(self) -> None:
        super().__init__()
        self.block_masks = BlockMaskCache()
        self._compiled: Callable | None = None
        self._compile_lock = threading.Lock()
        self._small_tile_variants: set[tuple] = set()  # variants whose default tiles overflow shared memory

    def _probe(self) -> Availability:
        from torch.nn.attention import flex_attention as _  # noqa: F401  (raises where torch predates flex)

        if not torch._dynamo.is_dynamo_supported():  # even eager flex traces through dynamo
            return Availability(False, torch.__version__, "flex_attention needs torch.compile (dynamo) support")
        return Availability(True, torch.__version__)

    def extra_reasons(self, call, caps):
        reasons = []
        if call.device.type == "cpu" and call.needs_grad:
            # SDPA has no softcap: for a softcapped call the CPU provider with gradients is the math one
            reasons.append(CPU_NO_BACKWARD if call.softcap is None else CPU_NO_BACKWARD_SOFTCAP)
        if call.device.type == "cuda" and min(call.head_dim, call.value_dim) < MIN_CUDA_HEAD_DIM:
            reasons.append(
                f"head dims ({call.head_dim}, value {call.value_dim}) below {MIN_CUDA_HEAD_DIM} are not supported"
            )
        return reasons

    # -- building blocks ------------------------------------------------------------------------------
    def block_mask(self, call: AttentionCall):
        """The call's BlockMask (cached), or None when neither causal, a window nor a boolean mask hides
        anything."""
        mask, limits = block_structure(call)
        mask_mod = mask_mod_for(mask, limits)
        if mask_mod is None:
            return None  # flex then attends everywhere, with no mask_mod to evaluate

        def build():
            batch, heads = _mask_dims(mask)
            return build_block_mask(mask_mod, batch, heads, call.q_len, call.kv_len, call.device)

        key = BlockMaskCache.key(mask, limits, call.q_len, call.kv_len, call.device)
        return self.block_masks.get_or_build(key, mask, build)

    def _kernel(self, device: torch.device) -> Callable:
        """flex_attention for this device: compiled once on CUDA (fused kernel), eager elsewhere."""
        from torch.nn.attention.flex_attention import flex_attention

        if device.type != "cuda":
            return flex_attention
        with self._compile_lock:
            if self._compiled is None:
                self._compiled = compile_flex(flex_attention)
            return self._compiled

    def _flex(self, call: AttentionCall, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """Run flex on (q, k, v) with the call's masks and scale: (out, natural-log lse as flex returns it).

        The lse is always requested, also where only out is used: one call signature means one compiled graph
        per variant instead of two, and writing (B, H, Sq) floats costs nothing next to attention.
        """
        variant = _tile_variant(call)
        options = SMALL_TILES if variant in self._small_tile_variants else None
        try:
            return self._run_kernel(call, q, k, v, options)
        except Exception as exc:
            if call.device.type != "cuda" or not _is_compile_error(exc):
                raise
            if options is not None or not _is_out_of_shared_memory(exc):
                raise _compile_failure(call, exc) from exc
            # The default tiles of some variants overflow shared memory; retry (and remember) smaller ones.
            self._small_tile_variants.add(variant)
        try:
            return self._run_kernel(call, q, k, v, SMALL_TILES)
        except Exception as exc:
            if _is_compile_error(exc):
                raise _compile_failure(call, exc) from exc
            raise

    def _run_kernel(self, call: AttentionCall, q, k, v, kernel_options: dict | None):
        kernel = self._kernel(call.device)
        out, aux = kernel(
            q, k, v, score_mod=score_mod_for(call), block_mask=self.block_mask(call), scale=call.scale,
            enable_gqa=call.groups > 1, kernel_options=kernel_options, **_lse_request(),
        )
        return out, getattr(aux, "lse", aux)  # AuxOutput on torch >= 2.9, the lse tensor before

    # -- the contract -----------------------------------------------------------------------------------
    def attention(self, call: AttentionCall) -> torch.Tensor:
        if _empty(call):
            return _EXACT.attention(_exact_call(call))
        if call.device.type == "cuda":
            # flex's own autograd runs its fused backward: faster than the contract's recomputation.
            return self._flex(call, call.query, call.key, call.value)[0]
        with torch.no_grad():
            return self._flex(call, *_detached(call))[0]

    def forward(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        if _empty(call):
            return _EXACT.forward(_exact_call(call))
        with torch.no_grad():
            out, lse = self._flex(call, *_detached(call))
        # flex already gives a natural-log lse with -inf on rows that see no key; only the dtype may differ.
        return out, normalize_lse(lse, call.q_len)

    def backward(self, call, dout, out, lse):
        if call.device.type != "cuda":
            raise UnsupportedInputError(f"provider '{self.name}'", [CPU_NO_BACKWARD])
        if _empty(call):
            return _EXACT.backward(_exact_call(call), dout, out, lse)

        def block_forward(q, k, v):
            return self._flex(call, q, k, v)

        return recompute_block_grads(block_forward, call, dout, out, lse)


def _empty(call: AttentionCall) -> bool:
    """No queries or no keys (a context-parallel rank may hold no token): flex_attention raises IndexError on
    these, so the exact math path answers them (nothing to tile; out 0 and lse -inf where rows see no key)."""
    return call.q_len == 0 or call.kv_len == 0


def _exact_call(call: AttentionCall) -> AttentionCall:
    """`call` as the math path takes it: a window as a mask (the math path has a softcap of its own)."""
    return scoremods.as_kernel_call(_EXACT, call)


def _lse_request() -> dict:
    """Keyword arguments that make flex return its lse: return_aux on new torch, return_lse before it."""
    from torch.nn.attention import flex_attention as module

    if hasattr(module, "AuxRequest"):
        return {"return_aux": module.AuxRequest(lse=True)}
    return {"return_lse": True}


def compile_flex(flex_attention: Callable) -> Callable:
    """torch.compile(flex_attention) with room for the variants one adapter compiles.

    Each grad mode, mask kind, dtype and scale is its own graph. Past dynamo's default of 8 graphs per
    function it silently falls back to eager flex, which materialises the whole score matrix (tens of times
    slower, quadratic memory). Where torch.compile takes them, a per-call limit and isolated recompiles keep
    this adapter's graphs from counting against (or being counted by) other compiles of flex_attention;
    older torch gets the limit raised around each call instead.
    """
    params = inspect.signature(torch.compile).parameters
    options = {}
    if "recompile_limit" in params:
        options["recompile_limit"] = RECOMPILE_LIMIT
    if "isolate_recompiles" in params:
        options["isolate_recompiles"] = True
    compiled = torch.compile(flex_attention, **options)
    if "recompile_limit" in options:
        return compiled

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"

    def with_raised_limit(*args, **kwargs):
        with config.patch(**{name: max(getattr(config, name), RECOMPILE_LIMIT)}):
            return compiled(*args, **kwargs)

    return with_raised_limit


def make_providers() -> list[Provider]:
    return [Flex()]
