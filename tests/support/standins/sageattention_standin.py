"""STAND-IN for the `sageattention` package, for testing cpattn's adapter glue only. It is NOT SageAttention.

There is no quantisation and no kernel here: every function computes exact attention with torch in float32
(on CPU in the tests) behind the Python API of thu-ml/SageAttention's `sageattention/core.py`, so that the
adapter's calls, layouts and LSE handling can be checked without a GPU. What it reproduces on purpose:

* function names, signatures (including **kwargs, which swallows unknown keywords) and defaults, for
  2.x (`build("2.2.0")`) and for 1.x (`build("1.0.6")`: only `sageattn` and `sageattn_varlen`, no
  `return_lse`, head dims 64/96/128 (varlen 64/128), `k -= km` *in place* when smooth_k=True, and
  without is_causal the zero padding of the last 64-key block counted in the softmax, as the 1.0.6 wheel's
  Triton kernels do when a key length is not a multiple of 64);
* layouts: "HND" (B, H, S, D) and "NHD" (B, S, H, D); varlen packing (total, H, D) with cu_seqlens;
  GQA as num_qo_heads divisible by num_kv_heads; 2.x pads head dims to 64/128 and slices the output;
* the LSE: the "kernel" produces it in base 2 and the 2.x wrappers divide by 1.44269504; with smooth_k
  the kernel sees K - mean(K), so its LSE is low by sm_scale * q . mean(K). `corrects_lse=True` adds the
  correction back like the current 2.x wrappers (`q @ km^T`, which, as there, raises for 1 < Hkv < Hq);
  `corrects_lse=False` returns the smoothed-K LSE, the offset reported for other builds;
* `sageattn` (2.x) does not pass smooth_k on to the kernel it picks (here always the Triton path);
* `core.SM80_ENABLED` / `SM89_ENABLED` / `SM90_ENABLED` flags and the asserts that use them;
* a varlen sequence with no key gives NaN rows (the real kernels leave them undefined);
* 1.x causal: when the last 128-query block of a sequence holds at most 64 rows, the last sequence's last
  head gives NaN rows in that block. The 1.0.6 kernels load one K scale past the end of their tensor there,
  and NaN came out when that memory held a NaN or Inf (seen on an H100); here it always does.

Deliberate deviations: it runs on the devices in `__cpattn_standin_devices__` (the flag that tells cpattn
this is a stand-in) and accepts float32 there, so tests can hold the adapter to float32 tolerances.
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch
import torch.nn.functional as F

LOG2E = 1.44269504  # the constant the 2.x wrappers divide the kernels' base-2 LSE by
STANDIN_DEVICES = ("cpu", "cuda")
V1_BLOCK_N = 64  # keys per block in the 1.0.6 Triton kernels
V1_BLOCK_M = 128  # queries per block in its causal kernels


def _v1_overread_rows(seq_len: int) -> slice | None:
    """The rows of the last query block, when 1.0.6's causal walk reads a K scale past the end (see header)."""
    tail = seq_len % V1_BLOCK_M
    return slice(seq_len - tail, seq_len) if 0 < tail <= V1_BLOCK_N else None


def build(
    version: str = "2.2.0",
    *,
    corrects_lse: bool = True,
    kernels_built: tuple[str, ...] = ("sm80", "sm89", "sm90"),
) -> types.ModuleType:
    """A fresh module object to install as sys.modules['sageattention']."""
    module = types.ModuleType("sageattention", "stand-in for sageattention (tests only)")
    module.__version__ = version
    module.__cpattn_standin_devices__ = STANDIN_DEVICES
    module.__cpattn_standin__ = True
    functions = _v1_api() if version.startswith("1.") else _v2_api(corrects_lse, kernels_built)
    module.core = types.SimpleNamespace(
        **functions, **{f"{arch.upper()}_ENABLED": arch in kernels_built for arch in ("sm80", "sm89", "sm90")}
    )
    for name, fn in functions.items():
        setattr(module, name, fn)
    return module


# -- the "kernel": exact attention, LSE in base 2 like the CUDA/Triton kernels -----------------------


def _kernel(q, k, v, is_causal, sm_scale, counts_block_padding=False):
    """(B, Hq, Sq, D) inputs -> (out float32, lse base 2 float32 (B, Hq, Sq)).

    counts_block_padding: the 1.0.6 Triton kernels' behaviour without is_causal: the last 64-key block is
    loaded with zeros past kv_len and never masked, so each padding key scores 0 and joins the softmax
    denominator (with value 0).
    """
    groups = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(groups, dim=1)
    v = v.float().repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * sm_scale
    if is_causal:
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    elif counts_block_padding and k.shape[2] % V1_BLOCK_N:
        pad = V1_BLOCK_N - k.shape[2] % V1_BLOCK_N
        scores = F.pad(scores, (0, pad))
        v = F.pad(v, (0, 0, 0, pad))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse.unsqueeze(-1)) @ v  # a row with no key gives NaN, as 0/0 would
    return out, lse * LOG2E


def _check(q, k, v, dtypes):
    assert q.device.type in STANDIN_DEVICES, "Input tensors must be on cuda."
    allowed = dtypes + ((torch.float32,) if q.device.type == "cpu" else ())
    assert q.dtype in allowed, "Input tensors must be in dtype of torch.float16 or torch.bfloat16"
    assert q.device == k.device == v.device, "All tensors must be on the same device."
    assert q.dtype == k.dtype == v.dtype, "All tensors must have the same dtype."


def _to_hnd(t, layout):
    return t if layout == "HND" else t.transpose(1, 2)


def _pad_head_dim_v2(q, k, v):
    head_dim = q.size(-1)
    if head_dim > 128:
        raise ValueError(f"Unsupported head_dim: {head_dim}")
    target = 64 if head_dim <= 64 else 128
    return tuple(F.pad(t, (0, target - head_dim)) for t in (q, k, v))


# -- 2.x ---------------------------------------------------------------------------------------------


def _v2_api(corrects_lse, kernels_built):
    half = (torch.float16, torch.bfloat16)

    def wrapper(q, k, v, tensor_layout, is_causal, sm_scale, smooth_k, return_lse):
        _check(q, k, v, half)
        dtype, head_dim_og = q.dtype, q.size(-1)
        q, k, v = _pad_head_dim_v2(q, k, v)
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "Last dim of qkv must be contiguous."
        sm_scale = head_dim_og**-0.5 if sm_scale is None else sm_scale
        q, k, v = (_to_hnd(t, tensor_layout) for t in (q, k, v))
        if smooth_k:
            km = k.mean(dim=2, keepdim=True)
            if return_lse:
                lse_correction = torch.matmul(q, km.transpose(2, 3)).squeeze(-1).to(torch.float32)
            k = k - km
        out, lse = _kernel(q, k, v, is_causal, sm_scale)
        out = _to_hnd(out.to(dtype), tensor_layout)[..., :head_dim_og]
        if not return_lse:
            return out
        lse = lse / LOG2E
        if smooth_k and corrects_lse:
            lse = lse + lse_correction * sm_scale
        return out, lse

    def require(arch):
        assert arch in kernels_built, f"{arch.upper()} kernel is not available."

    def sageattn(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str = "HND", is_causal: bool = False,
        sm_scale: Optional[float] = None, return_lse: bool = False, **kwargs: Any,
    ):
        # Like the library: no smooth_k here, so the chosen kernel smooths with its default (True).
        return sageattn_qk_int8_pv_fp16_triton(
            q, k, v, tensor_layout=tensor_layout, is_causal=is_causal, sm_scale=sm_scale, return_lse=return_lse
        )

    def sageattn_qk_int8_pv_fp16_triton(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str = "HND",
        quantization_backend: str = "triton", is_causal: bool = False, sm_scale: Optional[float] = None,
        smooth_k: bool = True, return_lse: bool = False, **kwargs: Any,
    ):
        assert quantization_backend in ("triton", "cuda"), f"Unsupported quantization backend: {quantization_backend}"
        return wrapper(q, k, v, tensor_layout, is_causal, sm_scale, smooth_k, return_lse)

    def sageattn_qk_int8_pv_fp16_cuda(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str = "HND", is_causal: bool = False,
        qk_quant_gran: str = "per_thread", sm_scale: Optional[float] = None, pv_accum_dtype: str = "fp32",
        smooth_k: bool = True, smooth_v: bool = False, return_lse: bool = False, **kwargs: Any,
    ):
        require("sm80")
        assert qk_quant_gran in ("per_warp", "per_thread"), "qk_quant_gran must be either 'per_warp' or 'per_thread'."
        if pv_accum_dtype not in ("fp32", "fp16", "fp16+fp32"):
            raise ValueError(f"Unsupported pv_accum_dtype: {pv_accum_dtype}")
        return wrapper(q, k, v, tensor_layout, is_causal, sm_scale, smooth_k, return_lse)

    def sageattn_qk_int8_pv_fp8_cuda(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str = "HND", is_causal: bool = False,
        qk_quant_gran: str = "per_thread", sm_scale: Optional[float] = None, pv_accum_dtype: str = "fp32+fp16",
        smooth_k: bool = True, smooth_v: bool = False, return_lse: bool = False, **kwargs: Any,
    ):
        require("sm89")
        assert qk_quant_gran in ("per_warp", "per_thread"), "qk_quant_gran must be either 'per_warp' or 'per_thread'."
        return wrapper(q, k, v, tensor_layout, is_causal, sm_scale, smooth_k, return_lse)

    def sageattn_qk_int8_pv_fp8_cuda_sm90(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str = "HND", is_causal: bool = False,
        qk_quant_gran: str = "per_thread", sm_scale: Optional[float] = None, pv_accum_dtype: str = "fp32+fp32",
        smooth_k: bool = True, return_lse: bool = False, **kwargs: Any,
    ):
        require("sm90")
        if pv_accum_dtype == "fp32":
            raise NotImplementedError("Please use pv_accum_dtype='fp32+fp32' for sm90.")
        return wrapper(q, k, v, tensor_layout, is_causal, sm_scale, smooth_k, return_lse)

    def sageattn_varlen(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int, max_seqlen_k: int, is_causal: bool = False, sm_scale: Optional[float] = None,
        smooth_k: bool = True, **kwargs: Any,
    ) -> torch.Tensor:
        _check(q, k, v, half)
        head_dim_og = q.size(-1)
        q, k, v = _pad_head_dim_v2(q, k, v)
        if smooth_k:
            k = k - k.mean(dim=0, keepdim=True)  # one mean over every packed sequence, as the library does
        sm_scale = head_dim_og**-0.5 if sm_scale is None else sm_scale
        return _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, sm_scale)[..., :head_dim_og]

    return {
        "sageattn": sageattn,
        "sageattn_varlen": sageattn_varlen,
        "sageattn_qk_int8_pv_fp16_triton": sageattn_qk_int8_pv_fp16_triton,
        "sageattn_qk_int8_pv_fp16_cuda": sageattn_qk_int8_pv_fp16_cuda,
        "sageattn_qk_int8_pv_fp8_cuda": sageattn_qk_int8_pv_fp8_cuda,
        "sageattn_qk_int8_pv_fp8_cuda_sm90": sageattn_qk_int8_pv_fp8_cuda_sm90,
    }


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, sm_scale, counts_block_padding=False):
    assert cu_seqlens_q.dtype in (torch.int32, torch.int64) and cu_seqlens_k.dtype in (torch.int32, torch.int64)
    assert cu_seqlens_q.is_contiguous() and cu_seqlens_k.is_contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        rows, cols = slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1])
        if cols.start == cols.stop:  # no key: the real kernels leave these rows undefined
            out[rows] = float("nan")
            continue
        seq = [t[s].transpose(0, 1).unsqueeze(0) for t, s in ((q, rows), (k, cols), (v, cols))]
        o, _ = _kernel(*seq, is_causal, sm_scale, counts_block_padding)
        out[rows] = o[0].transpose(0, 1).to(q.dtype)
    return out


# -- 1.x ---------------------------------------------------------------------------------------------


def _v1_api():
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def sageattn(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tensor_layout: str = "HND", is_causal=False,
        sm_scale: Optional[float] = None, smooth_k: bool = True, **kwargs: Any,
    ) -> torch.Tensor:
        _check(q, k, v, dtypes)
        headdim = q.size(-1)
        assert headdim in [64, 96, 128], "headdim should be in [64, 96, 128]."
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "Last dim of qkv must be contiguous."
        seq_dim = 1 if tensor_layout == "NHD" else 2
        if smooth_k:
            k -= k.mean(dim=seq_dim, keepdim=True)  # in place, on the caller's tensor, as 1.x does
        sm_scale = headdim**-0.5 if sm_scale is None else sm_scale
        out, _ = _kernel(*(_to_hnd(t, tensor_layout) for t in (q, k, v)), is_causal, sm_scale, True)
        rows = _v1_overread_rows(out.shape[2]) if is_causal else None
        if rows is not None:
            out[-1, -1, rows] = float("nan")
        return _to_hnd(out.to(q.dtype), tensor_layout)

    def sageattn_varlen(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int, max_seqlen_k: int, is_causal: bool = False, sm_scale: Optional[float] = None,
        smooth_k: bool = True, **kwargs: Any,
    ) -> torch.Tensor:
        _check(q, k, v, dtypes)
        head_dim = q.size(-1)
        assert head_dim in [64, 128], "varlen only support head_dim [64, 128]."
        if smooth_k:
            k -= k.mean(dim=0, keepdim=True)
        sm_scale = head_dim**-0.5 if sm_scale is None else sm_scale
        out = _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, is_causal, sm_scale, True)
        start, end = cu_seqlens_q[-2:].tolist()
        rows = _v1_overread_rows(end - start) if is_causal else None
        if rows is not None:
            out[start + rows.start:start + rows.stop, -1] = float("nan")
        return out

    return {"sageattn": sageattn, "sageattn_varlen": sageattn_varlen}
