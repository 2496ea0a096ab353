"""xFormers adapter: `xformers.ops.memory_efficient_attention` and its forward/backward halves.

Functions used (signatures read from facebookresearch/xformers `xformers/ops/fmha/__init__.py`):

    memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None, ...)
        single-device path, with xformers' own autograd and dropout
    memory_efficient_attention_forward_requires_grad(query, key, value, attn_bias=None, p=0.0, scale=None,
        *, op=None, ...) -> (out, lse)                               the contract's forward (p must be 0)
    memory_efficient_attention_backward(grad, output, lse, query, key, value, attn_bias=None, p=0.0,
        scale=None, *, op=None) -> (dq, dk, dv)                     the contract's backward, external (out, lse)

Layout is (B, M, H, K): cpattn's (B, H, S, D) goes in and comes out as transpose views (xformers only needs
the last dim contiguous). GQA: KV heads are repeated to Hq (the 5-D BMGHK form is forward-only in xformers).
Masks: is_causal alone becomes `attn_bias.LowerTriangularMask()` (top-left aligned like SDPA: it
materialises as triu(-inf, diagonal=1) of (Mq, Mk)); any attn_mask becomes an additive tensor bias in the
query dtype, with is_causal folded in, expanded to exactly (B, H, Mq, Mk) as xformers demands, over storage
whose rows are 16-element aligned (the CUTLASS kernels reject other strides). The LSE is natural-log float32
(B, H, Mq) but padded along Mq (to a multiple of 32 by the CUTLASS forward, with +inf in the padding), so it
is sliced and normalised; rows that see no key are set to lse -inf and output 0 here, not trusted to the kernel.

Score modifications: `memory_efficient_attention` of the targeted releases has no window, softcap or sink
argument (its local-attention biases are not used here), so the generic routes apply (cpattn/scoremods.py): a
window becomes part of the tensor bias (dense: no block is skipped), sinks enter through the log-sum-exp that
the forward returns and the backward takes, and a softcap is refused.

Availability: xformers loads even when its C++/CUDA extension does not (it only logs a warning), and then
finds no operator at call time. `_probe()` reads `xformers._has_cpp_library` and the load exception that
`xformers._cpp_lib` keeps, and names the torch version the extension was built for.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..contract import (
    AttentionCall,
    Availability,
    Capabilities,
    Provider,
    causal_mask,
    device_capability,
    empty_query_rows,
    expand_kv,
    lse_for_kernel_backward,
    normalize_lse,
    reduce_kv_grad,
)
from ..errors import UnsupportedInputError
from ..masks import as_additive, expand_to_4d, open_empty_rows
from ._libs import (
    installed_version,
    is_missing_module,
    missing_parameters,
    parse_version,
    standin_capabilities,
    standin_devices,
)
from .native import DENSE_WINDOW_NOTE

MIN_VERSION = "0.0.29.post3"
INSTALL_HINT = (
    f"pip install 'xformers>={MIN_VERSION}' built for this torch and CUDA "
    "(e.g. --index-url https://download.pytorch.org/whl/cu126)"
)
_FORWARD_PARAMS = ("query", "key", "value", "attn_bias", "p", "scale")
_BACKWARD_PARAMS = ("grad", "output", "lse") + _FORWARD_PARAMS
_FUNCTIONS = {
    "memory_efficient_attention": _FORWARD_PARAMS,
    "memory_efficient_attention_forward_requires_grad": _FORWARD_PARAMS,
    "memory_efficient_attention_backward": _BACKWARD_PARAMS,
}
_BIAS_ROW_ALIGNMENT = 16  # elements; CUTLASS wants every bias stride but the last a multiple of 128 bits


class XFormers(Provider):
    """xFormers memory-efficient attention (CUTLASS/flash kernels chosen by xformers' dispatcher)."""

    name = "xformers"
    family = "xformers"
    package = "xformers"
    min_version = MIN_VERSION
    description = "xformers.ops.memory_efficient_attention (CUTLASS / flash kernels, tensor bias)"
    supports: ClassVar[dict[str, Capabilities]] = {
        "cuda": Capabilities(
            dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), head_dim_multiple=8,
            min_compute_capability=(5, 0), bool_mask=True, additive_mask=True, key_padding_mask=True,
            dropout=True, backward=True, training=True, deterministic_backward=False,
            notes=(
                "GQA by repeating KV heads (extra memory for the repeated K/V)",
                "masks run as an additive tensor bias (slower than is_causal alone)",
                DENSE_WINDOW_NOTE,
            ),
        ),
    }

    def __init__(self) -> None:
        super().__init__()
        self._fmha = None
        self._devices: tuple[str, ...] = ()

    # -- availability -------------------------------------------------------------------------
    def _probe(self) -> Availability:
        try:
            xformers = importlib.import_module("xformers")
        except ImportError as exc:
            if is_missing_module(exc, "xformers"):
                return Availability(False, None, f"xformers is not installed: {INSTALL_HINT}")
            return Availability(False, None, f"xformers failed to import ({type(exc).__name__}: {exc})")
        version = installed_version(xformers, "xformers") or "unknown"
        if version != "unknown" and parse_version(version) < parse_version(MIN_VERSION):
            return Availability(False, version, f"needs xformers>={MIN_VERSION} (found {version}): {INSTALL_HINT}")
        problem = _extension_problem(xformers)
        if problem:
            return Availability(False, version, problem)
        fmha = importlib.import_module("xformers.ops.fmha")
        problem = _api_problem(fmha, version)
        if problem:
            return Availability(False, version, problem)
        self._fmha = fmha
        self._devices = standin_devices(xformers)
        return Availability(True, version)

    def capabilities(self, device_type: str) -> Capabilities | None:
        caps = self.supports.get(device_type)
        if caps is None and self.availability().ok and device_type in self._devices:
            caps = standin_capabilities(self.supports["cuda"])
        return caps

    def extra_reasons(self, call: AttentionCall, caps: Capabilities) -> list[str]:
        if call.device.type == "cuda" and call.dtype == torch.bfloat16:
            have = device_capability(call.device)
            if have < (8, 0):
                return [f"xformers runs bfloat16 on sm80 or newer only, this GPU is sm{have[0]}{have[1]}"]
        return []

    # -- kernels ------------------------------------------------------------------------------
    def attention(self, call: AttentionCall) -> torch.Tensor:
        q, k, v = _bmhk_inputs(call)
        if call.attn_mask is None:
            bias, empty = self._bias(call), None
        else:  # rows that see no key are opened for the kernel and zeroed after (masks.open_empty_rows): the
            # stand-in's autograd gave NaN dQ/dK there from lse = -inf, as exp(s - lse) makes
            mask, empty = open_empty_rows(masked_with_causal(call))
            bias = aligned_bias(mask, call)
        out = self._run(
            self._api().memory_efficient_attention, q, k, v, attn_bias=bias, p=call.dropout_p, scale=call.scale,
        ).transpose(1, 2)
        return out if empty is None else out.masked_fill(empty, 0.0)

    def forward(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = _bmhk_inputs(call)
        out, lse = self._run(
            self._api().memory_efficient_attention_forward_requires_grad, q, k, v,
            attn_bias=self._bias(call), p=0.0, scale=call.scale,
        )
        empty = empty_query_rows(call)
        out = out.transpose(1, 2)
        if empty is not None:
            out = out.masked_fill(empty.unsqueeze(-1), 0.0)
        return out, normalize_lse(lse, call.q_len, empty_rows=empty)

    def backward(self, call, dout, out, lse):
        q, k, v = _bmhk_inputs(call)
        dq, dk, dv = self._run(
            self._api().memory_efficient_attention_backward,
            dout.transpose(1, 2), out.transpose(1, 2), lse_for_kernel_backward(lse).float(), q, k, v,
            attn_bias=self._bias(call), p=0.0, scale=call.scale,
        )
        dk, dv = dk.transpose(1, 2), dv.transpose(1, 2)
        return dq.transpose(1, 2), reduce_kv_grad(dk, call.groups), reduce_kv_grad(dv, call.groups)

    def _api(self):
        """xformers.ops.fmha, probed on first use (adapters are also called without the dispatcher)."""
        self.require_available()
        return self._fmha

    def _run(self, fn, *args, **kwargs):
        """Call xformers; its dispatcher's 'no operator found' becomes cpattn's UnsupportedInputError."""
        try:
            return fn(*args, **kwargs)
        except NotImplementedError as exc:
            detail = str(exc).strip().splitlines()
            raise UnsupportedInputError(
                f"provider '{self.name}'", [f"xformers has no kernel for these inputs: {' '.join(detail[:6])}"]
            ) from exc

    def _bias(self, call: AttentionCall):
        if call.attn_mask is None:
            return self._api().attn_bias.LowerTriangularMask() if call.is_causal else None
        return tensor_bias(call)


# -- helpers ---------------------------------------------------------------------------------------


def _extension_problem(xformers) -> str | None:
    """Why xformers' C++/CUDA extension did not load, or None if it did (or the build has none to load)."""
    if getattr(xformers, "_has_cpp_library", True):
        return None
    error = getattr(getattr(xformers, "_cpp_lib", None), "_cpp_library_load_exception", None)
    if error is None:
        return None  # a pure-Python build: kernels come from elsewhere, the dispatcher will say if none fits
    built_for = getattr(getattr(error, "build_info", None), "torch_version", None)
    if built_for is None:
        return (
            f"xformers C++/CUDA extension did not load ({type(error).__name__}: {str(error).splitlines()[0]}); "
            f"install an xformers build matching torch {torch.__version__}: {INSTALL_HINT}"
        )
    return (
        f"xformers C++/CUDA extension did not load: built for torch {built_for}, this is torch "
        f"{torch.__version__}; install an xformers build matching torch {torch.__version__}: {INSTALL_HINT}"
    )


def _api_problem(fmha, version: str) -> str | None:
    for name, params in _FUNCTIONS.items():
        fn = getattr(fmha, name, None)
        if fn is None:
            return f"xformers {version} has no xformers.ops.fmha.{name}(): {INSTALL_HINT}"
        missing = missing_parameters(fn, params)
        if missing:
            return f"xformers {version}: {name}() has no parameter {', '.join(missing)}, which cpattn passes"
    if getattr(getattr(fmha, "attn_bias", None), "LowerTriangularMask", None) is None:
        return f"xformers {version} has no xformers.ops.fmha.attn_bias.LowerTriangularMask"
    return None


def _bmhk_inputs(call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, M, H, K) views for xformers, KV heads repeated to the query heads."""
    k, v = expand_kv(call.key, call.groups), expand_kv(call.value, call.groups)
    return call.query.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def tensor_bias(call: AttentionCall) -> torch.Tensor:
    """attn_mask (and is_causal) as the additive (B, H, Mq, Mk) bias xformers takes, in the query dtype."""
    return aligned_bias(masked_with_causal(call), call)


def masked_with_causal(call: AttentionCall) -> torch.Tensor:
    """attn_mask as 4-D, with is_causal folded in."""
    mask = expand_to_4d(call.attn_mask)
    if call.is_causal:
        causal = causal_mask(call.q_len, call.kv_len, call.device)
        mask = mask & causal if mask.dtype == torch.bool else mask.masked_fill(~causal, float("-inf"))
    return mask


def aligned_bias(mask: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """A 4-D mask as the additive bias xformers takes, in the query dtype.

    Only the key dim is materialised for broadcast masks (the kernel reads bias rows with stride 1); rows
    sit on 16-element boundaries, so every stride but the last is 128-bit aligned; broadcast dims keep
    stride 0, which is aligned too.
    """
    bias = as_additive(mask, call.dtype)
    bias = bias.expand(*bias.shape[:-1], call.kv_len)
    pad = (-call.kv_len) % _BIAS_ROW_ALIGNMENT
    storage = F.pad(bias, (0, pad)) if pad else bias.contiguous()
    return storage[..., : call.kv_len].expand(call.batch, call.q_heads, call.q_len, call.kv_len)


def make_providers() -> list[Provider]:
    return [XFormers()]
