"""STAND-IN for the `xformers` package, for testing cpattn's adapter glue only. It is NOT xFormers.

No kernels: exact attention with torch in float32 behind the Python API of facebookresearch/xformers
(`xformers/ops/fmha/__init__.py`, `attn_bias.py`, `_cpp_lib.py`), so the adapter can be checked on CPU.
What it reproduces on purpose:

* modules `xformers`, `xformers._cpp_lib`, `xformers.ops`, `xformers.ops.fmha`, `xformers.ops.fmha.attn_bias`
  and the signatures of `memory_efficient_attention`, `memory_efficient_attention_forward_requires_grad`
  (raises NotImplementedError for p != 0) and `memory_efficient_attention_backward(grad, output, lse,
  query, key, value, attn_bias, p, scale, *, op)`;
* layout (B, M, H, K) with equal head counts (no broadcasting: "please use `expand` yourself");
* attn_bias: None, `LowerTriangularMask()` (top-left: triu(-inf, diagonal=1)), or a tensor of exactly
  shape (B, H, Mq, Mk) whose strides but the last are multiples of 128 bits (else, like the dispatcher,
  NotImplementedError "No operator found");
* the LSE: natural log, float32, (B, H, Mq) padded along Mq to a multiple of 32 with +inf (CUTLASS);
  rows with no visible key give lse -inf and output 0; backward accepts an lse padded or not;
* a failed C++/CUDA extension (`build(extension_built_for_torch=...)`): `_has_cpp_library` False, the load
  exception kept in `xformers._cpp_lib`, and every attention call raising NotImplementedError.

Deliberate deviation: it runs on the devices in `__cpattn_standin_devices__`, the flag telling cpattn that
this is a stand-in.
"""

from __future__ import annotations

import math
import types
from typing import Optional

import torch

STANDIN_DEVICES = ("cpu", "cuda")
LSE_PAD = 32


def build(version: str = "0.0.35", *, extension_built_for_torch: str | None = None) -> dict[str, types.ModuleType]:
    """Fresh module objects, by name, to install into sys.modules."""
    cpp_lib = _cpp_lib_module(extension_built_for_torch)
    attn_bias = _attn_bias_module()
    fmha = _fmha_module(attn_bias, kernels=cpp_lib._has_cpp_library)
    ops = types.ModuleType("xformers.ops")
    ops.fmha = fmha
    ops.memory_efficient_attention = fmha.memory_efficient_attention
    ops.LowerTriangularMask = attn_bias.LowerTriangularMask
    ops.AttentionBias = attn_bias.AttentionBias
    root = types.ModuleType("xformers", "stand-in for xformers (tests only)")
    root.__version__ = version
    root.__cpattn_standin_devices__ = STANDIN_DEVICES
    root._cpp_lib = cpp_lib
    root._has_cpp_library = cpp_lib._has_cpp_library
    root.ops = ops
    return {
        "xformers": root, "xformers._cpp_lib": cpp_lib, "xformers.ops": ops, "xformers.ops.fmha": fmha,
        "xformers.ops.fmha.attn_bias": attn_bias,
    }


# -- xformers._cpp_lib ------------------------------------------------------------------------------


class _BuildInfo:
    def __init__(self, torch_version: str) -> None:
        self.metadata = {"version": {"torch": torch_version, "cuda": 1208, "python": "3.12"}}

    @property
    def torch_version(self) -> str:
        return self.metadata["version"]["torch"]


class xFormersInvalidLibException(Exception):
    def __init__(self, build_info: Optional[_BuildInfo]) -> None:
        self.build_info = build_info

    def __str__(self) -> str:
        return (
            "xFormers can't load C++/CUDA extensions. xFormers was built for:\n"
            f"    PyTorch {self.build_info.torch_version} (you have {torch.__version__})"
        )


def _cpp_lib_module(built_for_torch: str | None) -> types.ModuleType:
    module = types.ModuleType("xformers._cpp_lib")
    module.xFormersInvalidLibException = xFormersInvalidLibException
    if built_for_torch is None:
        module._build_metadata = _BuildInfo(torch.__version__)
        module._has_cpp_library = True
        module._cpp_library_load_exception = None
    else:
        module._build_metadata = None
        module._has_cpp_library = False
        module._cpp_library_load_exception = xFormersInvalidLibException(_BuildInfo(built_for_torch))
    return module


# -- xformers.ops.fmha.attn_bias --------------------------------------------------------------------


def _attn_bias_module() -> types.ModuleType:
    module = types.ModuleType("xformers.ops.fmha.attn_bias")

    class AttentionBias:
        def materialize(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
            raise NotImplementedError()

    class LowerTriangularMask(AttentionBias):
        """A lower-triangular (aka causal) mask: query i sees keys 0..i (top-left aligned)."""

        def __init__(self, *tensor_args, **tensor_kwargs) -> None:
            super().__init__()

        def materialize(self, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
            tensor = torch.full(shape, float("-inf"), dtype=torch.float32, device=device)
            return torch.triu(tensor, diagonal=1).to(dtype)

    module.AttentionBias = AttentionBias
    module.LowerTriangularMask = LowerTriangularMask
    return module


# -- xformers.ops.fmha ------------------------------------------------------------------------------


def _fmha_module(attn_bias: types.ModuleType, kernels: bool) -> types.ModuleType:
    module = types.ModuleType("xformers.ops.fmha")
    module.attn_bias = attn_bias
    module.LowerTriangularMask = attn_bias.LowerTriangularMask
    module.AttentionBias = attn_bias.AttentionBias

    def find_operator(query, key, value, bias):
        if not kernels:
            raise NotImplementedError(
                "No operator found for `memory_efficient_attention_forward` with inputs:\n"
                "`cutlassF` is not supported because:\n    operator wasn't built - see `python -m xformers.info`"
            )
        _validate(query, key, value, bias, attn_bias)

    def memory_efficient_attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias=None, p: float = 0.0,
        scale: Optional[float] = None, *, op=None, output_dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        find_operator(query, key, value, attn_bias)
        return _attention(query, key, value, attn_bias, p, scale)[0].to(output_dtype or query.dtype)

    def memory_efficient_attention_forward_requires_grad(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_bias=None, p: float = 0.0,
        scale: Optional[float] = None, *, op=None, output_dtype: Optional[torch.dtype] = None,
    ):
        if p != 0.0:
            raise NotImplementedError("dropout is not supported on the non-autograd API.")
        find_operator(query, key, value, attn_bias)
        with torch.no_grad():
            out, lse = _attention(query, key, value, attn_bias, 0.0, scale)
        pad = (-lse.shape[-1]) % LSE_PAD
        return out.to(output_dtype or query.dtype), torch.nn.functional.pad(lse, (0, pad), value=math.inf)

    def memory_efficient_attention_backward(
        grad: torch.Tensor, output: torch.Tensor, lse: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
        value: torch.Tensor, attn_bias=None, p: float = 0.0, scale: Optional[float] = None, *, op=None,
    ):
        if p != 0.0:
            raise NotImplementedError("dropout is not supported on the non-autograd API.")
        find_operator(query, key, value, attn_bias)
        b, m, h, _ = query.shape
        if lse.ndim != 3 or lse.shape[0] != b or lse.shape[1] != h or lse.shape[2] < m:
            raise ValueError(f"Input tensors have incompatible shapes.lse.shape: {lse.shape}\nquery.shape: {query.shape}")
        return _backward(grad, output, lse[:, :, :m], query, key, value, attn_bias, scale)

    module.memory_efficient_attention = memory_efficient_attention
    module.memory_efficient_attention_forward_requires_grad = memory_efficient_attention_forward_requires_grad
    module.memory_efficient_attention_backward = memory_efficient_attention_backward
    return module


def _validate(query, key, value, bias, attn_bias_module) -> None:
    if not (query.ndim == key.ndim == value.ndim == 4):
        raise ValueError("Query/Key/Value should all have BMGHK, BMHK or BMK shape (stand-in: BMHK only).")
    if query.device.type not in STANDIN_DEVICES:
        raise NotImplementedError(f"No operator found: device={query.device.type}")
    b, mq, h, k = query.shape
    mk = key.shape[1]
    if key.shape != (b, mk, h, k) or value.shape[:3] != (b, mk, h):
        raise ValueError(
            f"Incompatible shapes for attention inputs:\n  query.shape: {query.shape}\n  key.shape  : {key.shape}\n"
            f"  value.shape: {value.shape}\nHINT: We don't support broadcasting, please use `expand` yourself"
        )
    if any(t.stride(-1) != 1 for t in (query, key, value)):
        raise NotImplementedError("No operator found: the last dim of query/key/value must be contiguous")
    if isinstance(bias, torch.Tensor):
        if tuple(bias.shape) != (b, h, mq, mk):
            raise ValueError(f"Invalid shape for attention bias: {tuple(bias.shape)} (expected {(b, h, mq, mk)})")
        alignment = 128 // torch.finfo(bias.dtype).bits
        if bias.stride(-1) != 1 or any(bias.stride(d) % alignment for d in range(bias.ndim - 1)):
            raise NotImplementedError(
                f"No operator found for `memory_efficient_attention_forward`: attn_bias.stride(-2) % {alignment} "
                f"!= 0 (attn_bias.stride() = {bias.stride()})"
            )
    elif bias is not None and not isinstance(bias, attn_bias_module.LowerTriangularMask):
        raise NotImplementedError(f"No operator found: attn_bias type is {type(bias)}")


def _scores(query, key, bias, scale):
    """(B, H, Mq, Mk) float32 scores with the bias applied."""
    q, k = query.float().transpose(1, 2), key.float().transpose(1, 2)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if isinstance(bias, torch.Tensor):
        return scores + bias.float()
    if bias is not None:
        return scores + bias.materialize(tuple(scores.shape[-2:]), device=scores.device)
    return scores


def _attention(query, key, value, bias, p, scale):
    """(out (B, Mq, H, Kv), lse (B, H, Mq)); differentiable; rows with no key give out 0, lse -inf."""
    scores = _scores(query, key, bias, scale)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isneginf(lse), 0.0, lse)
    probs = torch.exp(scores - safe.unsqueeze(-1))
    if p > 0:
        probs = torch.nn.functional.dropout(probs, p)
    out = probs @ value.float().transpose(1, 2)
    return out.transpose(1, 2), lse


def _backward(grad, output, lse, query, key, value, bias, scale):
    """Gradients from an external (output, lse): P = exp(s - lse) (lse +inf gives P = 0)."""
    scores = _scores(query, key, bias, scale)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    probs = torch.exp(scores - lse.float().unsqueeze(-1))
    d_out = grad.float().transpose(1, 2)
    v = value.float().transpose(1, 2)
    delta = (d_out * output.float().transpose(1, 2)).sum(dim=-1, keepdim=True)
    d_scores = probs * (d_out @ v.transpose(-1, -2) - delta)
    dq = (d_scores @ key.float().transpose(1, 2)) * scale
    dk = (d_scores.transpose(-1, -2) @ query.float().transpose(1, 2)) * scale
    dv = probs.transpose(-1, -2) @ d_out
    return tuple(g.transpose(1, 2).to(query.dtype) for g in (dq, dk, dv))

