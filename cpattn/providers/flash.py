"""FlashAttention: `flash` (fixed-length batches) and `flash_varlen` (key padding, packed sequences).

Generations
    Both providers run on whichever FlashAttention generation is installed, found lazily the first time
    availability is asked (never at ``import cpattn``):

    * FlashAttention-2: ``flash_attn`` >= 2.6.3 (``pip install flash-attn``), sm80 and newer.
    * FlashAttention-3: module ``flash_attn_interface`` (built from flash-attention/hopper), sm90.
    * FlashAttention-4: ``flash_attn.cute`` (``pip install flash-attn-4``), CuTe-DSL kernels, sm90/sm100.

    With several installed, the GPU of the current device picks the order (sm100+: 4, 2, 3; sm90: 3, 4, 2;
    older: 2, 3, 4; no GPU: 3, 4, 2); an installed generation whose API does not match is skipped with a
    warning. ``Availability.version`` says which one was found, e.g. ``"flash-attn-2 2.7.4"``.

Private API
    The contract's forward/backward need the log-sum-exp and a backward that takes an external (out, lse);
    only the libraries' private functions give both, and their parameters changed between releases. The probe
    reads every function's parameters (from the custom-op schema where the library registers one, else the
    Python signature) and refuses the generation with a message naming it, the function and the parameter,
    instead of a TypeError deep inside a kernel call. Calls pass keywords only; parameters without a default
    that cpattn does not set get values that switch their feature off (no window, softcap or ALiBi).
    FA4 on sm90, at the release it was checked with, goes one level lower where it can: its forward kernel is
    compiled per shape class and called directly (fa4_forward), and one call's backward runs its three kernels
    (fa4_rows). On an H100 that skipped 65-94 us of the library's Python per forward and 17-28 us per
    backward; the outputs are the library's (tests/gpu/fa4_direct_check.py).

Layout and conventions
    Inputs (B, H, S, D) go to the kernels as (B, S, H, D) transpose views, KV heads unexpanded (GQA is
    native). Head dims are zero-padded to a multiple of 8 (the kernels' alignment; zeros change no score) and
    sliced back; FA4 on sm90 pads wider where its backward is wrong or its forward slow otherwise
    (`_Generation.backward_head_dim_multiple`, `forward_head_dim_multiple`). Rows that see no key come back
    with out 0 and lse +inf (FA2/FA3) or -inf (FA4): the contract wants -inf, and +inf again when handed back
    to a backward kernel. flash-attn aligns causal masks to the
    bottom-right corner, SDPA to the top-left: the two agree only when q_len == kv_len, the only causal case
    these providers accept.

flash_varlen
    Takes SDPA-style padded inputs with a boolean key-padding mask (B or 1, 1, 1, Sk): keys and values are
    unpadded into cu_seqlens, queries stay padded as B full-length sequences. Its varlen LSE, (H, total_q) in
    flash-attn >= 2.6, FA3 and FA4 or (B, H, max_seqlen_q) before, is brought back to (B, H, Sq).
    `flash_varlen_attention` is the packed API on (total, H, D) tensors.

Testing without a GPU
    A module that sets ``__cpattn_standin_devices__`` declares itself a stand-in (see
    tests/support/standins/flash_attn_standin.py); only then do these adapters also accept the devices it lists, so
    the glue can be tested on CPU. Real FlashAttention modules never set it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F

from ..contract import (
    HALF_DTYPES,
    AttentionCall,
    Availability,
    Capabilities,
    ContractAttentionFunction,
    Provider,
    autocast_off,
    default_scale,
    device_capability,
    lse_for_kernel_backward,
    normalize_lse,
    on_device,
    rows_may_be_empty,
)
from ..errors import InvalidArgumentError, UnsupportedInputError
from . import fa4_forward, fa4_rows
from ._libs import STANDIN_DEVICES_ATTR, parse_version

MIN_FA2_VERSION = parse_version("2.6.3")
HEAD_DIM_ALIGN = 8
INSTALL_HINT = (
    "pip install 'flash-attn>=2.6.3' --no-build-isolation (FlashAttention-2, sm80+), "
    "pip install flash-attn-4 (FlashAttention-4, sm90/sm100), or build FlashAttention-3 from "
    "flash-attention/hopper (sm90)"
)

# Values for kernel parameters that have no default and that cpattn never sets: each switches a feature off.
_NEUTRAL_ARGS = {
    "window_size": (-1, -1),
    "window_size_left": -1,
    "window_size_right": -1,
    "softcap": 0.0,
    "alibi_slopes": None,
    "return_softmax": False,
    "block_table": None,
    "rng_state": None,
    "leftpad_k": None,
    "seqused_q": None,
    "seqused_k": None,
}

_VARLEN_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


# -- binding library functions by parameter name ---------------------------------------------------------------


class FlashApiError(Exception):
    """An installed FlashAttention cannot be used as found (its private API changed, or it is too old)."""


def _parameters(fn: Callable) -> dict[str, bool] | None:
    """Parameter name -> whether it has a default. flash-attn >= 2.7 and FA3 wrap their private functions in
    torch custom ops, whose Python signature is (*args, **kwargs): read the op schema there instead."""
    schema = getattr(getattr(fn, "_opoverload", None), "_schema", None)
    if schema is not None:
        return {arg.name: arg.has_default_value() for arg in schema.arguments}
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {
        p.name: p.default is not inspect.Parameter.empty
        for p in signature.parameters.values()
        if p.kind not in variadic
    }


@dataclass(frozen=True)
class _Entry:
    """One library function whose parameters were checked at probe time; called with keywords only."""

    fn: Callable
    where: str
    renames: dict[str, str]  # the adapter's name -> the library's, where releases differ (causal / is_causal)
    accepted: frozenset[str]
    optional: frozenset[str]  # names the adapter passes only where the library has them
    fill: dict[str, Any]  # neutral values for parameters without default that the adapter does not set

    def __call__(self, **kwargs):
        return self.fn(**self._arguments(kwargs))

    def partial(self, **fixed) -> Callable:
        """The function with `fixed` bound once (renamed and filled as a call would): a cached runner calls it
        with the remaining keywords and pays for no renaming."""
        return functools.partial(self.fn, **self._arguments(fixed))

    def _arguments(self, kwargs: dict) -> dict:
        """The library's keywords for the adapter's: renamed, filled with neutral values, checked."""
        args = dict(self.fill)
        for name, value in kwargs.items():
            actual = self.renames.get(name, name)
            if actual in self.accepted:
                args[actual] = value
            elif name not in self.optional:
                raise TypeError(f"cpattn passes '{name}' to {self.where}, which was not checked at probe time")
        return args


def _bind(
    title: str, module: Any, module_name: str, fn_name: str, needs: Sequence[str | tuple[str, ...]],
    optional: Sequence[str] = (),
) -> _Entry:
    """Check that `module.fn_name` takes every parameter in `needs` (a tuple lists accepted spellings, the
    adapter's first) and nothing required beyond them; raise FlashApiError naming what differs."""
    where = f"{module_name}.{fn_name}"
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise FlashApiError(f"{title}: {where} does not exist in this version (its private API changed)")
    params = _parameters(fn)
    if params is None:
        raise FlashApiError(f"{title}: cannot read the parameters of {where}")
    renames, passed = {}, set()
    for need in needs:
        spellings = (need,) if isinstance(need, str) else need
        found = next((name for name in spellings if name in params), None)
        if found is None:
            raise FlashApiError(
                f"{title}: {where} has no parameter '{spellings[0]}' (its private API changed; cpattn's adapter "
                f"cannot call it safely)"
            )
        if found != spellings[0]:
            renames[spellings[0]] = found
        passed.add(found)
    passed |= {name for name in optional if name in params}
    fill = {}
    for name, has_default in params.items():
        if has_default or name in passed:
            continue
        if name not in _NEUTRAL_ARGS:
            raise FlashApiError(
                f"{title}: {where} has a new required parameter '{name}' that cpattn does not know how to set"
            )
        fill[name] = _NEUTRAL_ARGS[name]
    return _Entry(fn, where, renames, frozenset(params), frozenset(optional), fill)


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _import(title: str, name: str):
    """The module, ModuleNotFoundError if it (or a parent package) is not installed, FlashApiError if it is
    installed but fails to import (a missing CUDA extension, a driver error): that one is worth reporting."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise ModuleNotFoundError(f"{title}: {name} is not installed") from exc
        raise FlashApiError(f"{title}: importing {name} failed ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:
        raise FlashApiError(f"{title}: importing {name} failed ({type(exc).__name__}: {exc})") from exc


def _first(result):
    """Public functions return out, or (out, lse, ...) depending on generation and release."""
    return result[0] if isinstance(result, (tuple, list)) else result


@dataclass(frozen=True)
class _Packing:
    """cu_seqlens and maximum lengths of a varlen call (int32 tensors on the inputs' device)."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int

    def kwargs(self) -> dict:
        return dict(zip(_VARLEN_ARGS, (self.cu_seqlens_q, self.cu_seqlens_k, self.max_seqlen_q, self.max_seqlen_k)))


# -- generations --------------------------------------------------------------------------------------------------


class _Generation:
    """The entry points of one FlashAttention generation, bound for the dense or the varlen provider.

    Kernel methods take (B, S, H, D) tensors (varlen: (total, H, D)) whose head dims are already aligned,
    and return the library's raw results (its LSE convention, its layouts).
    """

    title: ClassVar[str]
    label: ClassVar[str]  # how Availability.version names it

    def __init__(self, version: str, modules: Sequence[Any], varlen: bool):
        self.version = version
        self.varlen = varlen
        self.standin_devices = tuple(
            sorted({d for m in modules for d in getattr(m, STANDIN_DEVICES_ATTR, ())})
        )

    # What a subclass provides.
    max_head_dim: ClassVar[int] = 256
    extra_notes: ClassVar[tuple[str, ...]] = ()
    min_compute_capability: ClassVar[tuple[int, int]] = (8, 0)
    has_dropout: ClassVar[bool] = False

    def capabilities(self) -> Capabilities:
        notes = [
            f"backed by {self.title} {self.version}",
            "is_causal needs q_len == kv_len (flash-attn aligns causal masks to the bottom-right corner)",
            "value head dim must equal the query head dim",
            "backward is deterministic only under torch.use_deterministic_algorithms(True)",
        ]
        if self.varlen:
            notes.append("key-padding masks become cu_seqlens; is_causal cannot be combined with a mask")
        notes += self.extra_notes
        if self.standin_devices:
            notes.append(f"STAND-IN library: also accepts {', '.join(self.standin_devices)} (adapter tests only)")
        return Capabilities(
            dtypes=HALF_DTYPES, max_head_dim=self.max_head_dim, min_compute_capability=self.min_compute_capability,
            causal=True, key_padding_mask=self.varlen, varlen=self.varlen, dropout=self.has_dropout, gqa=True,
            backward=True, training=True, deterministic_backward=False, notes=tuple(notes),
            row_views=not self.varlen,  # (B, S, H, D) views with any row offset; varlen packing would copy
        )

    def limits(self, call: AttentionCall, compute_capability: tuple[int, int]) -> list[str]:
        """Generation-specific reasons a CUDA call cannot run (beyond its Capabilities)."""
        return []

    def backward_head_dim_multiple(self, compute_capability: tuple[int, int] | None) -> int:
        """The multiple the head dims are padded to when the backward kernel runs (HEAD_DIM_ALIGN unless a
        generation's backward is wrong at other head dims); `compute_capability` None off CUDA."""
        return HEAD_DIM_ALIGN

    def forward_head_dim_multiple(self, compute_capability: tuple[int, int] | None, head_dim: int) -> int:
        """The multiple `head_dim` is padded to when only the forward kernel runs (HEAD_DIM_ALIGN unless a
        generation's forward measured faster on a wider head dim)."""
        return HEAD_DIM_ALIGN

    def row_backward_kernels(self) -> "fa4_rows.Sm90BackwardKernels | None":
        """The kernels a ring rank's backward can launch one by one around one dQ accumulator (fa4_rows), or
        None: then each ring step runs the whole backward."""
        return None

    def forward(self, q, k, v, scale, causal):
        raise NotImplementedError

    def backward(self, dout, q, k, v, out, lse, scale, causal, deterministic):
        raise NotImplementedError

    def varlen_forward(self, q, k, v, packing: _Packing, scale, causal):
        raise NotImplementedError

    def varlen_backward(self, dout, q, k, v, out, lse, packing: _Packing, scale, causal, deterministic):
        raise NotImplementedError

    def function(self, q, k, v, scale, causal, dropout_p, deterministic):
        """The public autograd function; dropout_p > 0 only reaches generations with has_dropout."""
        return _first(self._func(q=q, k=k, v=v, **self._function_options(scale, causal, dropout_p, deterministic)))

    def function_of_qkv(self, scale, causal, dropout_p, deterministic) -> Callable:
        """`function` with everything but q, k and v bound once, for a cached runner."""
        kernel = self._func.partial(**self._function_options(scale, causal, dropout_p, deterministic))
        return lambda q, k, v: _first(kernel(q=q, k=k, v=v))

    def inference_of_qkv(self, scale, causal) -> Callable:
        """For calls that need no gradient and no dropout: the cheapest call of the same kernel on (q, k, v),
        everything else bound once. Here the public function; a generation may skip its autograd wrapper."""
        return self.function_of_qkv(scale, causal, 0.0, False)

    def training_of_bhsd(self, scale, causal, deterministic) -> Callable | None:
        """For calls that need gradients, without dropout: a function of (B, H, S, D) q, k, v that runs the same
        kernels as the public function as one autograd node; None where the public function stays."""
        return None

    def _function_options(self, scale, causal, dropout_p, deterministic) -> dict:
        """The public function's keywords besides q, k, v (generations without dropout take none)."""
        return {"softmax_scale": scale, "causal": causal, "deterministic": deterministic}

    def varlen_function(self, q, k, v, packing: _Packing, scale, causal, dropout_p, deterministic):
        raise NotImplementedError


class _BufferBackward(_Generation):
    """FA2 and FA3 backward kernels write into dq/dk/dv buffers the caller allocates (FA2 <= 2.6 also returns
    them, FA2 >= 2.7 and FA3 return only softmax_d); the buffers keep the layout of q, k, v."""

    backward_extra: ClassVar[dict] = {}

    def _grads_into_buffers(self, dout, q, k, v, out, lse, scale, causal, deterministic, **varlen):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._bwd(
            dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv, **varlen, **self.backward_extra,
            softmax_scale=scale, causal=causal, deterministic=deterministic,
        )
        return dq, dk, dv

    def backward(self, dout, q, k, v, out, lse, scale, causal, deterministic):
        return self._grads_into_buffers(dout, q, k, v, out, lse, scale, causal, deterministic)

    def varlen_backward(self, dout, q, k, v, out, lse, packing, scale, causal, deterministic):
        return self._grads_into_buffers(dout, q, k, v, out, lse, scale, causal, deterministic, **packing.kwargs())


class _FlashAttention2(_BufferBackward):
    """flash_attn.flash_attn_interface: _flash_attn[_varlen]_forward/_backward and the public functions."""

    title, label = "FlashAttention-2", "flash-attn-2"
    min_compute_capability = (8, 0)
    has_dropout = True
    backward_extra = {"dropout_p": 0.0}  # contract backward: no dropout (forward() never applies it either)
    api_name = "flash_attn.flash_attn_interface"

    @classmethod
    def load(cls, varlen: bool) -> "_FlashAttention2":
        package = _import(cls.title, "flash_attn")
        api = _import(cls.title, cls.api_name)
        version = getattr(package, "__version__", None) or _dist_version("flash-attn") or "unknown"
        if version != "unknown" and parse_version(version) < MIN_FA2_VERSION:
            raise FlashApiError(
                f"{cls.title}: flash-attn {version} is older than 2.6.3; "
                "pip install -U 'flash-attn>=2.6.3' --no-build-isolation"
            )
        return cls(version, (package, api), varlen)

    def __init__(self, version, modules, varlen):
        super().__init__(version, modules, varlen)
        api = modules[1]
        kernel = ("dropout_p", "softmax_scale", "causal")
        grads = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv")
        bind = lambda name, needs: _bind(self.title, api, self.api_name, name, needs)  # noqa: E731
        if varlen:
            self._fwd = bind("_flash_attn_varlen_forward", ("q", "k", "v", *_VARLEN_ARGS, *kernel))
            self._bwd = bind("_flash_attn_varlen_backward", (*grads, *_VARLEN_ARGS, *kernel, "deterministic"))
            self._func = bind("flash_attn_varlen_func", ("q", "k", "v", *_VARLEN_ARGS, *kernel, "deterministic"))
        else:
            self._fwd = bind("_flash_attn_forward", ("q", "k", "v", *kernel))
            self._bwd = bind("_flash_attn_backward", (*grads, *kernel, "deterministic"))
            self._func = bind("flash_attn_func", ("q", "k", "v", *kernel, "deterministic"))

    @classmethod
    def _out_lse(cls, result):
        # <= 2.6: (out, q, k, v, out_padded, lse, S_dmask, rng_state); >= 2.7: (out_padded, lse, S_dmask, rng_state)
        if len(result) == 8:
            return result[0], result[5]
        if len(result) == 4:
            return result[0], result[1]
        raise FlashApiError(f"{cls.title}: the forward returned {len(result)} values; cpattn knows 4 and 8")

    def forward(self, q, k, v, scale, causal):
        return self._out_lse(self._fwd(q=q, k=k, v=v, dropout_p=0.0, softmax_scale=scale, causal=causal))

    def varlen_forward(self, q, k, v, packing, scale, causal):
        return self._out_lse(
            self._fwd(q=q, k=k, v=v, **packing.kwargs(), dropout_p=0.0, softmax_scale=scale, causal=causal)
        )

    def _function_options(self, scale, causal, dropout_p, deterministic):
        return {"dropout_p": dropout_p, "softmax_scale": scale, "causal": causal, "deterministic": deterministic}

    def varlen_function(self, q, k, v, packing, scale, causal, dropout_p, deterministic):
        return _first(self._func(
            q=q, k=k, v=v, **packing.kwargs(), dropout_p=dropout_p, softmax_scale=scale, causal=causal,
            deterministic=deterministic,
        ))


class _FlashAttention3(_BufferBackward):
    """flash_attn_interface (hopper/): _flash_attn_forward/_backward (dense and varlen) and public functions."""

    title, label = "FlashAttention-3", "flash-attn-3"
    min_compute_capability = (9, 0)
    api_name = "flash_attn_interface"

    @classmethod
    def load(cls, varlen: bool) -> "_FlashAttention3":
        api = _import(cls.title, cls.api_name)
        version = getattr(api, "__version__", None) or _dist_version("flash-attn-3", "flash_attn_3") or "unknown"
        return cls(version, (api,), varlen)

    def __init__(self, version, modules, varlen):
        super().__init__(version, modules, varlen)
        api = modules[0]
        bind = lambda name, needs: _bind(self.title, api, self.api_name, name, needs)  # noqa: E731
        grads = ("dout", "q", "k", "v", "out", "softmax_lse", "dq", "dk", "dv")
        # One private forward/backward pair serves both layouts (cu_seqlens=None is the dense case).
        self._fwd = bind("_flash_attn_forward", ("q", "k", "v", *_VARLEN_ARGS, "softmax_scale", "causal"))
        self._bwd = bind(
            "_flash_attn_backward",
            (*grads, *_VARLEN_ARGS, "softmax_scale", ("causal", "is_causal"), "deterministic"),
        )
        if varlen:
            self._func = bind("flash_attn_varlen_func", ("q", "k", "v", *_VARLEN_ARGS, "softmax_scale", "causal",
                                                        "deterministic"))
        else:
            self._func = bind("flash_attn_func", ("q", "k", "v", "softmax_scale", "causal", "deterministic"))

    def limits(self, call, compute_capability):
        if compute_capability[0] != 9:
            sm = "sm%d%d" % compute_capability
            return [f"FlashAttention-3 kernels are built for Hopper (sm90); this GPU is {sm}"]
        return []

    def forward(self, q, k, v, scale, causal):
        out, lse, *_ = self._fwd(q=q, k=k, v=v, softmax_scale=scale, causal=causal)
        return out, lse

    def varlen_forward(self, q, k, v, packing, scale, causal):
        out, lse, *_ = self._fwd(q=q, k=k, v=v, **packing.kwargs(), softmax_scale=scale, causal=causal)
        return out, lse

    def varlen_function(self, q, k, v, packing, scale, causal, dropout_p, deterministic):
        return _first(self._func(
            q=q, k=k, v=v, **packing.kwargs(), softmax_scale=scale, causal=causal, deterministic=deterministic
        ))


class _FlashAttention4(_Generation):
    """flash_attn.cute: interface._flash_attn_fwd/_flash_attn_bwd and the public functions."""

    title, label = "FlashAttention-4", "flash-attn-4"
    min_compute_capability = (9, 0)
    extra_notes = ("with gradients on sm90, head dims are zero-padded to a multiple of 32 (the library's sm90 "
                   "backward gave wrong gradients at 16, 48, 72, 80 and 112)",
                   "on sm90, head dims 97 to 104 are zero-padded to 128 for the forward too (1.5 to 1.75x faster)")
    api_name = "flash_attn.cute.interface"
    public_name = "flash_attn.cute"

    @classmethod
    def load(cls, varlen: bool) -> "_FlashAttention4":
        public = _import(cls.title, cls.public_name)
        api = _import(cls.title, cls.api_name)
        version = getattr(public, "__version__", None)
        if version in (None, "0.0.0"):  # its __init__ asks metadata for a name that varies between releases
            version = _dist_version("flash-attn-4", "fa4", "flash-attn-cute") or "unknown"
        return cls(version, (public, api), varlen)

    def __init__(self, version, modules, varlen):
        super().__init__(version, modules, varlen)
        public, api = modules
        self._row_kernels = None if varlen or self.standin_devices else fa4_rows.Sm90BackwardKernels.load(
            api, version)
        # dense forwards on sm90 skip _flash_attn_fwd's per-call Python where they can (fa4_forward)
        self._direct_forward = None if varlen or self.standin_devices else fa4_forward.Sm90Forward.load(
            api, version)
        if self._direct_forward is not None:
            self.extra_notes = self.extra_notes + (
                "on sm90, dense forwards and one call's backward (Hq == Hkv) launch the library's compiled kernels "
                "directly, without its per-call Python",)
        if self._row_kernels is not None:
            self.extra_notes = self.extra_notes + (
                "under ring attention on sm90, one float32 dQ accumulator per rank for all steps (Hq == Hkv, "
                "unpadded head dims)",)
        extra = _VARLEN_ARGS if varlen else ()
        self._fwd = _bind(self.title, api, self.api_name, "_flash_attn_fwd",
                          ("q", "k", "v", *extra, "softmax_scale", "causal", "return_lse"))
        self._bwd = _bind(self.title, api, self.api_name, "_flash_attn_bwd",
                          ("q", "k", "v", "out", "dout", "lse", *extra, "softmax_scale", "causal"),
                          optional=("deterministic",))
        name = "flash_attn_varlen_func" if varlen else "flash_attn_func"
        self._func = _bind(self.title, public, self.public_name, name,
                           ("q", "k", "v", *extra, "softmax_scale", "causal"), optional=("deterministic",))

    def limits(self, call, compute_capability):
        out = []
        hopper = compute_capability[0] == 9
        if hopper and self.varlen and call.needs_grad:
            out.append("FlashAttention-4 has no varlen backward on Hopper (sm90); use FlashAttention-2 or -3")
        if hopper and call.needs_grad and torch.are_deterministic_algorithms_enabled():
            out.append("FlashAttention-4 has a deterministic backward only on sm100/sm110")
        return out

    def row_backward_kernels(self):
        return self._row_kernels

    def backward_head_dim_multiple(self, compute_capability):
        # 4.0.0b36's sm90 backward gave dQ/dK/dV off by 0.5 to 2.2 at head dims 16, 48, 72 and 80 (forward right),
        # and matched float64 at 32, 64, 96, 128, 192 and 256, with the public function too
        # (benchmarks/fa4_grad_layout_probe.py on an H100). Padded with zero columns to a multiple of 32, the
        # gradients are exact; it costs the padded columns' FLOPs.
        return 32 if compute_capability is not None and compute_capability[0] == 9 else HEAD_DIM_ALIGN

    def forward_head_dim_multiple(self, compute_capability, head_dim):
        # 4.0.0b36's sm90 forward at head dim 104 ran 1.50 to 1.75x slower than the same call zero-padded to 128,
        # which beat cuDNN there (H100, bf16, S = 4k and 16k, causal and not: benchmarks/head_dim_pad_probe.py).
        # Head dims 97 to 103 run at 104 after alignment. At 80, 112 and 120 the padded kernel gained at most 4%,
        # less than the copy that pads costs, or lost: those keep the alignment of 8.
        hopper = compute_capability is not None and compute_capability[0] == 9
        return 32 if hopper and -(-head_dim // HEAD_DIM_ALIGN) * HEAD_DIM_ALIGN == 104 else HEAD_DIM_ALIGN

    # _flash_attn_fwd returns (out, lse, ...) and _flash_attn_bwd (dq, dk, dv, ...); 4.0.0b36 added trailing
    # values (p, row_max, o_lo / dqv, dsink), so keep only the leading ones.
    def forward(self, q, k, v, scale, causal):
        direct = self._direct_forward
        if direct is not None and direct.takes(q, k, v):
            return direct(q, k, v, scale, causal, return_lse=True)
        return tuple(self._fwd(q=q, k=k, v=v, softmax_scale=scale, causal=causal, return_lse=True)[:2])

    def varlen_forward(self, q, k, v, packing, scale, causal):
        return tuple(self._fwd(q=q, k=k, v=v, **packing.kwargs(), softmax_scale=scale, causal=causal,
                               return_lse=True)[:2])

    def inference_of_qkv(self, scale, causal):
        # flash_attn_func runs this same forward (return_lse=False) inside an autograd.Function, whose Python
        # costs more host time than the kernel launch at small shapes: without gradients, call it directly,
        # and where fa4_forward takes the tensors, without _flash_attn_fwd's Python too.
        forward = self._fwd.partial(softmax_scale=scale, causal=causal, return_lse=False)
        direct = self._direct_forward
        if direct is None:
            return lambda q, k, v: forward(q=q, k=k, v=v)[0]
        return lambda q, k, v: (direct(q, k, v, scale, causal, return_lse=False)[0] if direct.takes(q, k, v)
                                else forward(q=q, k=k, v=v)[0])

    def backward(self, dout, q, k, v, out, lse, scale, causal, deterministic):
        rows = self._row_kernels  # the same three launches without _flash_attn_bwd's per-call Python
        if rows is not None and not deterministic and rows.takes_whole(q, k, v):
            return rows.whole(q, k, v, out, dout, lse, scale, causal)
        return tuple(self._bwd(q=q, k=k, v=v, out=out, dout=dout, lse=lse, softmax_scale=scale, causal=causal,
                               deterministic=deterministic)[:3])

    def training_of_bhsd(self, scale, causal, deterministic):
        # The public function on transpose views is five autograd nodes (its own and four transposes); through
        # _TransposedFlash it is one, which saved 37 us of host time per forward and 66 us per forward+backward
        # in a stand-in measurement (cpattn's side only). At small shapes FA4's calls are host-bound on an H100.
        kernels = (lambda q, k, v: self.forward(q, k, v, scale, causal),
                   lambda dout, q, k, v, out, lse: self.backward(dout, q, k, v, out, lse, scale, causal,
                                                                 deterministic))
        return lambda q, k, v: _TransposedFlash.apply(q, k, v, kernels)

    def varlen_backward(self, dout, q, k, v, out, lse, packing, scale, causal, deterministic):
        return tuple(self._bwd(q=q, k=k, v=v, out=out, dout=dout, lse=lse, **packing.kwargs(), softmax_scale=scale,
                               causal=causal, deterministic=deterministic)[:3])

    def varlen_function(self, q, k, v, packing, scale, causal, dropout_p, deterministic):
        return _first(self._func(
            q=q, k=k, v=v, **packing.kwargs(), softmax_scale=scale, causal=causal, deterministic=deterministic
        ))


class _TransposedFlash(torch.autograd.Function):
    """A kernel pair that takes (B, S, H, D) tensors, on (B, H, S, D) q, k, v as one autograd node.

    forward runs the forward kernel on transpose views and keeps its (out, lse); backward runs the backward
    kernel on them with dout's transpose view and hands back the gradients' transpose views: the same kernels
    and layouts as the library's public function on transpose views, with the autograd bookkeeping of one node.
    """

    @staticmethod
    def forward(ctx, query, key, value, kernels):
        forward, ctx.backward_kernel = kernels
        out, lse = forward(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        ctx.save_for_backward(query, key, value, out, lse)
        return out.transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        query, key, value, out, lse = ctx.saved_tensors
        with autocast_off(dout.device):  # cpattn's own backward computes as it was written, inside autocast too
            dq, dk, dv = ctx.backward_kernel(dout.transpose(1, 2), query.transpose(1, 2), key.transpose(1, 2),
                                             value.transpose(1, 2), out, lse)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


def _preferred_generations() -> tuple[type[_Generation], ...]:
    """The newest kernels the current GPU runs first: FA4 on Blackwell, FA3 on Hopper, FA2 before that."""
    if not torch.cuda.is_available():
        return (_FlashAttention3, _FlashAttention4, _FlashAttention2)
    major = torch.cuda.get_device_capability()[0]
    if major >= 10:
        return (_FlashAttention4, _FlashAttention2, _FlashAttention3)
    if major == 9:
        return (_FlashAttention3, _FlashAttention4, _FlashAttention2)
    return (_FlashAttention2, _FlashAttention3, _FlashAttention4)


def _find_generation(varlen: bool) -> tuple[_Generation | None, list[str], list[str]]:
    """The first usable generation, the generations not installed, and those installed but unusable."""
    missing, unusable = [], []
    for kind in _preferred_generations():
        try:
            return kind.load(varlen), missing, unusable
        except ModuleNotFoundError as exc:
            missing.append(str(exc))
        except FlashApiError as exc:
            unusable.append(str(exc))
    return None, missing, unusable


# -- layouts ------------------------------------------------------------------------------------------------------


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def _align_head_dim(x: torch.Tensor, multiple: int = HEAD_DIM_ALIGN) -> torch.Tensor:
    """Zero-pad the last dim to a multiple of `multiple` (zero q/k columns change no score, zero v columns are
    sliced off the output; the softmax scale is always passed, so it stays that of the real head dim)."""
    pad = (-x.shape[-1]) % multiple
    return F.pad(x, (0, pad)) if pad else x


def _to_kernel(x: torch.Tensor, multiple: int = HEAD_DIM_ALIGN) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H, D) view, head dim padded to a multiple of `multiple`."""
    return _align_head_dim(x.transpose(1, 2), multiple)


def _from_kernel(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, S, H, D_aligned) -> (B, H, S, dim) view."""
    return x[..., :dim].transpose(1, 2)


@dataclass(frozen=True)
class _PaddedBatch:
    """How a padded (B, H, S, D) batch maps to flash-attn's packed layout: queries stay B full-length
    sequences, keys and values lose the positions a key-padding mask hides."""

    batch: int
    q_len: int
    kv_len: int
    keep: torch.Tensor | None  # (B, Sk) bool, None when no key is hidden
    packing: _Packing
    total_k: int
    empty: torch.Tensor | None  # (B,) bool: batch rows without any key, None if there are none
    multiple: int = HEAD_DIM_ALIGN  # head dims are zero-padded to a multiple of this

    @classmethod
    def from_call(cls, call: AttentionCall, multiple: int = HEAD_DIM_ALIGN) -> "_PaddedBatch":
        b, sq, sk, device = call.batch, call.q_len, call.kv_len, call.device
        steps = torch.arange(b + 1, dtype=torch.int32, device=device)
        if call.attn_mask is None:
            packing = _Packing(steps * sq, steps * sk, sq, sk)
            return cls(b, sq, sk, None, packing, b * sk, None, multiple)
        keep = call.attn_mask.expand(b, 1, 1, sk).reshape(b, sk)
        lengths = keep.sum(dim=1, dtype=torch.int32)
        cu_seqlens_k = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        host = lengths.tolist()  # one sync: the kernels take max_seqlen_k as a host integer
        empty = lengths == 0 if min(host) == 0 else None
        return cls(b, sq, sk, keep, _Packing(steps * sq, cu_seqlens_k, sq, max(host)), sum(host), empty, multiple)

    def pack_queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, Sq, D) -> (B*Sq, H, D_aligned); a copy, since packing merges batch and sequence dims."""
        return _align_head_dim(x.transpose(1, 2).reshape(self.batch * self.q_len, x.shape[1], x.shape[3]),
                               self.multiple)

    def unpack_queries(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """(B*Sq, H, D_aligned) -> (B, H, Sq, dim)."""
        return x.reshape(self.batch, self.q_len, x.shape[1], x.shape[2])[..., :dim].transpose(1, 2)

    def pack_keys(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, Sk, D) -> (total_k, H, D_aligned): only the keys the mask keeps."""
        x = x.transpose(1, 2)
        x = x.reshape(self.batch * self.kv_len, x.shape[2], x.shape[3]) if self.keep is None else x[self.keep]
        return _align_head_dim(x, self.multiple)

    def unpack_keys(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Gradients (total_k, H, D_aligned) -> (B, H, Sk, dim), zero at hidden keys."""
        x = x[..., :dim]
        if self.keep is None:
            return x.reshape(self.batch, self.kv_len, x.shape[1], dim).transpose(1, 2)
        full = x.new_zeros(self.batch, self.kv_len, x.shape[1], dim)
        full[self.keep] = x
        return full.transpose(1, 2)

    def lse_from_kernel(self, lse: torch.Tensor) -> torch.Tensor:
        """Varlen LSE -> (B, H, Sq): (H, total_q) from flash-attn >= 2.6, FA3, FA4; (B, H, max_seqlen_q) before."""
        if lse.dim() == 2:
            return lse.reshape(lse.shape[0], self.batch, self.q_len).permute(1, 0, 2)
        return lse[..., : self.q_len]

    def lse_to_kernel(self, lse: torch.Tensor) -> torch.Tensor:
        """Contract LSE (B, H, Sq) -> the (H, total_q) layout every supported release's varlen backward reads."""
        return lse_for_kernel_backward(lse).float().permute(1, 0, 2).reshape(lse.shape[1], -1).contiguous()

    def zero_empty_rows(self, out: torch.Tensor, lse: torch.Tensor | None = None):
        """Batch rows without keys: out 0, lse -inf, whatever the kernel left there."""
        if self.empty is None:
            return out, lse
        out = out.masked_fill(self.empty.view(-1, 1, 1, 1), 0.0)
        if lse is not None:
            lse = lse.masked_fill(self.empty.view(-1, 1, 1), float("-inf"))
        return out, lse


# -- providers ----------------------------------------------------------------------------------------------------


class _FlashFamily(Provider):
    """What `flash` and `flash_varlen` share: probing, capabilities, limits."""

    family = "flash"
    package = "flash-attn"
    min_version = "2.6.3"
    varlen: ClassVar[bool] = False
    # Static description for messages before probing; capabilities() gives the found generation's.
    supports = {
        "cuda": Capabilities(
            dtypes=HALF_DTYPES, max_head_dim=256, min_compute_capability=(8, 0), backward=True, training=True,
            deterministic_backward=False, notes=("FlashAttention-2/3/4, whichever is installed",),
        )
    }

    def __init__(self) -> None:
        super().__init__()
        self._generation: _Generation | None = None

    def _probe(self) -> Availability:
        self._generation = None
        found, missing, unusable = _find_generation(self.varlen)
        if found is None:
            if unusable:  # installed but unusable: that is the news, say it first
                reason = f"{'; '.join(unusable)}. Other generations are not installed; or {INSTALL_HINT}"
            else:
                reason = f"FlashAttention is not installed: {INSTALL_HINT}"
            return Availability(False, None, reason)
        if unusable:  # a preferred generation is installed but broken or changed: say so, run on the next one
            warnings.warn(f"provider '{self.name}' uses {found.title} {found.version}; skipped: {'; '.join(unusable)}",
                          RuntimeWarning, stacklevel=3)
        self._generation = found
        return Availability(True, f"{found.label} {found.version}")

    def generation(self) -> _Generation:
        self.require_available()
        return self._generation

    def capabilities(self, device_type: str) -> Capabilities | None:
        if not self.availability().ok:
            return self.supports.get(device_type)
        gen = self._generation
        if device_type == "cuda" or device_type in gen.standin_devices:
            return gen.capabilities()
        return None

    def head_dim_multiple(self, call: AttentionCall, backward: bool) -> int:
        """What the head dims are padded to for `call`'s kernels: HEAD_DIM_ALIGN unless the generation's backward
        needs more where it runs, or its forward is faster wider (see _Generation.backward_head_dim_multiple and
        forward_head_dim_multiple)."""
        gen = self.generation()
        cc = device_capability(call.device) if call.device.type == "cuda" else None
        forward = gen.forward_head_dim_multiple(cc, call.head_dim)
        return math.lcm(forward, gen.backward_head_dim_multiple(cc)) if backward else forward

    def pads_head_dim(self, call: AttentionCall) -> bool:
        """Whether `call`'s kernels run on zero-padded copies of the inputs (see head_dim_multiple)."""
        return call.head_dim % self.head_dim_multiple(call, call.needs_grad) != 0

    def extra_reasons(self, call: AttentionCall, caps: Capabilities) -> list[str]:
        out = []
        if call.head_dim != call.value_dim:
            out.append(f"value head dim {call.value_dim} != query head dim {call.head_dim}")
        if call.is_causal and call.q_len != call.kv_len:
            out.append(
                f"is_causal with q_len {call.q_len} != kv_len {call.kv_len}: flash-attn aligns the causal mask to "
                "the bottom-right corner, SDPA to the top-left (they agree only for equal lengths)"
            )
        if call.device.type == "cuda":
            out += self._generation.limits(call, device_capability(call.device))
        return out


class Flash(_FlashFamily):
    """FlashAttention on fixed-length batches: no attn_mask, causal, GQA, dropout where the generation has it."""

    name = "flash"
    description = "FlashAttention-2/3/4 (flash-attn), fixed-length batches without masks"
    varlen = False

    def runner(self, call: AttentionCall):
        # No device guard: dispatch wraps cached runners that need one (several GPUs) itself.
        kernel = self._kernel_of_bhsd(call)
        pad = (-call.head_dim) % self.head_dim_multiple(call, call.needs_grad)
        if not pad:
            return lambda q, k, v, mask: kernel(q, k, v)
        # Padded here rather than through `attention`: that path rebuilds the call and runs the public function
        # on five autograd nodes, host time that set the pace at S = 4k with gradients.
        dim = call.value_dim
        return lambda q, k, v, mask: kernel(F.pad(q, (0, pad)), F.pad(k, (0, pad)), F.pad(v, (0, pad)))[..., :dim]

    def _kernel_of_bhsd(self, call: AttentionCall) -> Callable:
        """The cheapest function of (B, H, S, D) q, k, v (head dims already aligned) that runs `call`'s kernels:
        one autograd node for training where the generation has it, the bare forward without gradients."""
        gen = self.generation()
        if call.needs_grad and not call.dropout_p:
            training = gen.training_of_bhsd(call.scale, call.is_causal, _deterministic())
            if training is not None:
                return training
        if call.needs_grad or call.dropout_p:
            kernel = gen.function_of_qkv(call.scale, call.is_causal, call.dropout_p, _deterministic())
        else:  # the cache key holds the gradient flag: a call that needs one gets another runner
            kernel = gen.inference_of_qkv(call.scale, call.is_causal)
        return lambda q, k, v: kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    def attention(self, call: AttentionCall) -> torch.Tensor:
        gen = self.generation()
        multiple = self.head_dim_multiple(call, call.needs_grad)
        q, k, v = (_to_kernel(t, multiple) for t in (call.query, call.key, call.value))
        with on_device(call.device):
            out = gen.function(q, k, v, call.scale, call.is_causal, call.dropout_p, _deterministic())
        return _from_kernel(out, call.value_dim)

    def forward(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        gen = self.generation()
        multiple = self.head_dim_multiple(call, backward=False)
        q, k, v = (_to_kernel(t.detach(), multiple) for t in (call.query, call.key, call.value))
        with torch.no_grad(), on_device(call.device):
            out, lse = gen.forward(q, k, v, call.scale, call.is_causal)
        lse = normalize_lse(lse, call.q_len, may_be_empty=rows_may_be_empty(call))
        return _from_kernel(out, call.value_dim), lse

    def backward(self, call, dout, out, lse):
        gen = self.generation()
        # The kernels want out/dout in the input dtype (a ring may keep the global out in float32).
        dtype, multiple = call.dtype, self.head_dim_multiple(call, backward=True)
        q, k, v, o, do = (  # out and dO padded like v: zero columns add nothing to dO . out
            _to_kernel(t.detach() if t.dtype == dtype else t.detach().to(dtype), multiple)
            for t in (call.query, call.key, call.value, out, dout)
        )
        lse_k = lse_for_kernel_backward(lse.detach(), rows_may_be_empty(call)).float().contiguous()
        with torch.no_grad(), on_device(call.device):
            dq, dk, dv = gen.backward(do, q, k, v, o, lse_k, call.scale, call.is_causal, _deterministic())
        return _from_kernel(dq, call.head_dim), _from_kernel(dk, call.head_dim), _from_kernel(dv, call.value_dim)

    def row_backward(self, call, dout, out, lse):
        # FA4 on sm90 keeps one dQ accumulator over a ring rank's steps where it can (fa4_rows)
        shared = fa4_rows.shared_accumulator(self, self.generation().row_backward_kernels(), call, dout, out, lse,
                                             self.head_dim_multiple(call, backward=True))
        return shared if shared is not None else super().row_backward(call, dout, out, lse)


class FlashVarlen(_FlashFamily):
    """FlashAttention's varlen kernels: SDPA-style padded batches with key-padding masks (keys are unpadded
    into cu_seqlens), and packed sequences through `flash_varlen_attention`."""

    name = "flash_varlen"
    description = "FlashAttention-2/3/4 varlen kernels: key-padding masks, packed sequences"
    varlen = True
    supports = {
        "cuda": dataclasses.replace(
            _FlashFamily.supports["cuda"], key_padding_mask=True, varlen=True,
            notes=("FlashAttention-2/3/4 varlen kernels; masks: key padding (B, 1, 1, Sk) only; packed streams "
                   "under CP: flash_varlen_attention with global cu_seqlens (all-gather)",),
        )
    }

    def extra_reasons(self, call, caps):
        out = super().extra_reasons(call, caps)
        if call.is_causal and call.attn_mask is not None:
            out.append("is_causal together with a key-padding mask (unpadding keys would shift the causal diagonal)")
        return out

    def attention(self, call: AttentionCall) -> torch.Tensor:
        batch = _PaddedBatch.from_call(call, self.head_dim_multiple(call, backward=call.needs_grad))
        if batch.total_k == 0:  # every key hidden: no kernel call, the contract path gives zeros
            if call.needs_grad:
                return ContractAttentionFunction.apply(self, call, call.query, call.key, call.value)
            return self.forward(call)[0]
        gen = self.generation()
        q = batch.pack_queries(call.query)
        k, v = batch.pack_keys(call.key), batch.pack_keys(call.value)
        with on_device(call.device):
            out = gen.varlen_function(q, k, v, batch.packing, call.scale, call.is_causal, call.dropout_p,
                                      _deterministic())
        return batch.zero_empty_rows(batch.unpack_queries(out, call.value_dim))[0]

    def forward(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        batch = _PaddedBatch.from_call(call, self.head_dim_multiple(call, backward=False))
        if batch.total_k == 0:
            out = call.query.new_zeros(call.batch, call.q_heads, call.q_len, call.value_dim)
            lse = torch.full((call.batch, call.q_heads, call.q_len), float("-inf"), device=call.device)
            return out, lse
        gen = self.generation()
        q = batch.pack_queries(call.query.detach())
        k, v = batch.pack_keys(call.key.detach()), batch.pack_keys(call.value.detach())
        with torch.no_grad(), on_device(call.device):
            out, lse = gen.varlen_forward(q, k, v, batch.packing, call.scale, call.is_causal)
        out = batch.unpack_queries(out, call.value_dim)
        lse = normalize_lse(batch.lse_from_kernel(lse), call.q_len)
        return batch.zero_empty_rows(out, lse)

    def backward(self, call, dout, out, lse):
        batch = _PaddedBatch.from_call(call, self.head_dim_multiple(call, backward=True))
        if batch.total_k == 0:
            return torch.zeros_like(call.query), torch.zeros_like(call.key), torch.zeros_like(call.value)
        gen = self.generation()
        q, o, do = (batch.pack_queries(t.detach().to(call.dtype)) for t in (call.query, out, dout))
        k, v = batch.pack_keys(call.key.detach()), batch.pack_keys(call.value.detach())
        with torch.no_grad(), on_device(call.device):
            dq, dk, dv = gen.varlen_backward(do, q, k, v, o, batch.lse_to_kernel(lse.detach()), batch.packing,
                                             call.scale, call.is_causal, _deterministic())
        dq = batch.zero_empty_rows(batch.unpack_queries(dq, call.head_dim))[0]
        return dq, batch.unpack_keys(dk, call.head_dim), batch.unpack_keys(dv, call.value_dim)


# -- packed API ---------------------------------------------------------------------------------------------------


def flash_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed sequences on the `flash_varlen` provider, with autograd.

    q: (total_q, Hq, D), k: (total_k, Hkv, D), v: (total_k, Hkv, D), Hq a multiple of Hkv. Sequence i owns
    rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:cu_seqlens_k[i+1] of k and v; cu_seqlens
    are int32, 1-D, start at 0, never decrease and end at total. `is_causal` needs every query sequence as long
    as its key sequence (the causal diagonal is then the same in flash-attn and SDPA). Returns (total_q, Hq, D).
    The checks read cu_seqlens on the host (one device sync).
    """
    from . import get_provider  # the registry imports this module
    from ..dispatch import current_state  # it imports the registry

    _check_packed_tensors(q, k, v)
    cp = current_state().cp
    if cp is not None and cp.world_size > 1:
        return _packed_under_cp(cp, get_provider("flash_varlen"), q, k, v, cu_seqlens_q, cu_seqlens_k,
                                max_seqlen_q, max_seqlen_k, is_causal, scale)
    lengths_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", q.device)
    lengths_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k", q.device)
    if len(lengths_q) != len(lengths_k):
        raise InvalidArgumentError(
            f"cu_seqlens_q describes {len(lengths_q)} sequences but cu_seqlens_k {len(lengths_k)}; they must agree"
        )
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, lengths_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, lengths_k)
    if is_causal and lengths_q != lengths_k:
        raise InvalidArgumentError(
            "is_causal=True needs every query sequence as long as its key sequence (flash-attn aligns the causal "
            f"mask bottom-right, SDPA top-left); got query lengths {lengths_q} and key lengths {lengths_k}"
        )
    provider = get_provider("flash_varlen")
    provider.require_available()  # a missing library is ProviderUnavailableError, as for any provider
    view = _packed_view(q, k, v, is_causal, scale)
    reasons = provider.reasons(view)
    if reasons:
        raise UnsupportedInputError("flash_varlen_attention", reasons)
    packing = _Packing(cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), int(max_seqlen_q), int(max_seqlen_k))
    return _run_varlen(provider.generation(), q, k, v, packing, view.scale, view.is_causal)


def _packed_view(q, k, v, is_causal, scale) -> AttentionCall:
    """The call as (1, H, total, D) views of the packed tensors: what the provider's checks and the context-parallel
    front read."""
    return AttentionCall(
        q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), v.unsqueeze(0).transpose(1, 2),
        is_causal=bool(is_causal), scale=default_scale(q.shape[-1]) if scale is None else float(scale),
        enable_gqa=q.shape[1] != k.shape[1],
    )


def _run_varlen(gen, q, k, v, packing: _Packing, scale: float, causal: bool) -> torch.Tensor:
    """One varlen kernel call on packed tensors (flash-attn's causal alignment: bottom-right)."""
    with on_device(q.device):
        out = gen.varlen_function(
            _align_head_dim(q), _align_head_dim(k), _align_head_dim(v), packing, scale, causal, 0.0, _deterministic(),
        )
    return out[..., : v.shape[-1]]


def _packed_under_cp(cp, provider, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal,
                     scale) -> torch.Tensor:
    """q, k, v: this rank's shard of one packed stream; cu_seqlens: that stream's global boundaries (see
    cpattn/cp/packed.py for the schedule)."""
    if q.shape[0] != k.shape[0] or not torch.equal(cu_seqlens_q.cpu(), cu_seqlens_k.cpu()):
        raise InvalidArgumentError(
            "under context parallelism flash_varlen_attention is self-attention over one packed stream: q, k and "
            "v are shards of the same tokens and cu_seqlens_q must equal cu_seqlens_k"
        )
    lengths = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, int(cu_seqlens_q[-1]), "the whole packed stream",
                                q.device)
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, lengths)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, lengths)
    provider.require_available()
    view = _packed_view(q, k, v, is_causal, scale)
    gen = provider.generation()

    def kernel(qc, kc, vc, cu_q, cu_k, max_q, max_k):  # bottom-right causal, as the schedule needs
        return _run_varlen(gen, qc, kc, vc, _Packing(cu_q, cu_k, max_q, max_k), view.scale, view.is_causal)

    return cp.run_packed(provider, view, kernel, cu_seqlens_q.tolist())


def _check_packed_tensors(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidArgumentError(f"{name} must be a packed (total, heads, head_dim) tensor, got {shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InvalidArgumentError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InvalidArgumentError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:2] != v.shape[:2]:
        raise InvalidArgumentError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in tokens and heads")
    if q.shape[2] != k.shape[2]:
        raise InvalidArgumentError(f"q head dim {q.shape[2]} != k head dim {k.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise InvalidArgumentError(f"q heads {q.shape[1]} must be a multiple of k/v heads {k.shape[1]}")


def _check_cu_seqlens(name: str, cu: Any, total: int, owner: str, device: torch.device) -> list[int]:
    """Validate one cu_seqlens tensor; return the sequence lengths."""
    if not isinstance(cu, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise InvalidArgumentError(f"{name} must be int32 (flash-attn reads it as int32), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise InvalidArgumentError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise InvalidArgumentError(f"{name} is on {cu.device} but q is on {device}")
    bounds = cu.tolist()
    if bounds[0] != 0:
        raise InvalidArgumentError(f"{name} must start at 0, got {bounds[0]}")
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    for i, length in enumerate(lengths):
        if length < 0:
            raise InvalidArgumentError(
                f"{name} must be non-decreasing; it drops from {bounds[i]} to {bounds[i + 1]} at index {i + 1}"
            )
    if bounds[-1] != total:
        raise InvalidArgumentError(
            f"{name} must end at the number of packed tokens of {owner} ({total}), got {bounds[-1]}"
        )
    return lengths


def _check_max_seqlen(name: str, value: Any, lengths: list[int]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an int, got {type(value).__name__}")
    if value < max(lengths):
        raise InvalidArgumentError(f"{name}={value} is smaller than the longest sequence ({max(lengths)})")


def make_providers() -> list[Provider]:
    return [Flash(), FlashVarlen()]


__all__ = ["Flash", "FlashVarlen", "STANDIN_DEVICES_ATTR", "flash_varlen_attention", "make_providers"]
