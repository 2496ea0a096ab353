"""FlashAttention-4's sm90 forward kernel, launched without the library's Python interface.

Why
    This path exists only for host time. flash_attn.cute's `_flash_attn_fwd` (and the public `flash_attn_func`
    around it) rebuilds, on every call, what only changes with the shape class: about a hundred lines of argument
    checks, the tile heuristic, a compile-cache key of some sixty values, alignment checks on each tensor. The
    kernel itself, once compiled, is a TVM-FFI function that takes torch tensors. At small shapes that Python
    costs more than the kernel, and a ring pays it once per step and rank. Here the kernel is compiled once per
    shape class, with the arguments and the tile the library itself would choose, and called directly;
    everything the library would decide differently falls back to it. A packed-document ring pays it per chain
    and rank too, so varlen calls (cu_seqlens) have the same launch.

What is the same
    The kernel class (FlashAttentionForwardSm90), its constructor arguments, the tile (`_tile_size_fwd_sm90`)
    and the call's argument list are those of `_flash_attn_fwd` in the checked releases for a dense call
    without window, softcap, sink, score/mask mod, paging or block sparsity. So the output and the
    log-sum-exp are the library's, bit for bit; tests/gpu/fa4_direct_check.py checks that on a GPU.

When
    sm90, a release inside the checked window (fa4_release_window: the arguments are private API), q/k/v in
    float16 or bfloat16 of one dtype, 4-D (B, S, H, D) with the last dim contiguous and every other stride (and
    the address) 16-byte aligned (the kernel assumes that; the library would copy otherwise), non-empty, Hq a
    multiple of Hkv, and head dims of 8 to 256 in steps of 8. `Sm90Forward.can_launch` checks that per call;
    otherwise the provider calls `_flash_attn_fwd`. Varlen calls (`launch_varlen`): 3-D (total, H, D) tensors of
    the same layout, int32 cu_seqlens on the device, at most the library's BIN_BATCH_SEARCH_THRESH sequences
    (above it the library builds a tile-count aid the launch here does not), no window, softcap or sinks
    (`can_launch_varlen`). On sm90 the library's varlen forward picks the same tile as the dense one (its tile
    heuristic reads no length there, and splits no keys), and the kernel takes the cu_seqlens in the slots a
    dense call leaves None.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...contract import device_capability
from . import fa4_release_window

# What the launch below reads from flash_attn.cute.interface: without any of them the library's function runs.
INTERFACE_NAMES = ("_tile_size_fwd_sm90", "FlashAttentionForwardSm90", "to_cute_tensor", "get_broadcast_dims",
                   "torch2cute_dtype_map", "AuxData", "cute")
# the varlen launch reads this too: the sequence count above which the library adds a scheduler aid
VARLEN_LIMIT_NAME = "BIN_BATCH_SEARCH_THRESH"
# The head dims the varlen launches' GPU check covered (tests/gpu/fa4_direct_check.py --only varlen); calls at
# other head dims run the library's functions until a run of that check covers them.
VARLEN_CHECKED_HEAD_DIMS = (64, 128)
_ALIGN_BYTES = 16
_DTYPES = (torch.float16, torch.bfloat16)


def missing_interface_names(api: Any) -> list[str]:
    """The names the launch reads that `api` (flash_attn.cute.interface) lacks."""
    return [name for name in INTERFACE_NAMES if not hasattr(api, name)]


class Sm90Forward:
    """flash_attn.cute's sm90 forward kernel, compiled per shape class and called with torch tensors."""

    def __init__(self, api: Any) -> None:
        self._api = api
        self._compiled: dict[tuple, Any] = {}

    @classmethod
    def load(cls, api: Any, version: str) -> "Sm90Forward | None":
        """The launcher for `api` of release `version`, or None outside the release window (see
        fa4_release_window) or where `api` lacks a name the launch reads."""
        if not fa4_release_window.allows(version) or missing_interface_names(api):
            return None
        return cls(api)

    def can_launch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether the direct launch runs this call exactly as `_flash_attn_fwd` would (see the module
        docstring); cheap enough to ask on every call."""
        if not (q.is_cuda and q.dtype in _DTYPES and q.dtype == k.dtype == v.dtype
                and q.dim() == k.dim() == v.dim() == 4 and device_capability(q.device)[0] == 9):
            return False
        if 0 in q.shape or 0 in k.shape or q.shape[2] % k.shape[2] or k.shape[:3] != v.shape[:3]:
            return False
        # the head dims the library's sm90 forward takes (it asserts on others)
        if not all(8 <= d <= 256 and d % 8 == 0 for d in (q.shape[3], v.shape[3])) or k.shape[3] != q.shape[3]:
            return False
        return _has_kernel_layout(q) and _has_kernel_layout(k) and _has_kernel_layout(v)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool,
                 return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(out (B, Sq, H, Dv) in q's dtype, lse (B, H, Sq) float32 or None), from (B, S, H, D) q, k, v that
        `can_launch` accepted; on the current CUDA device's current stream."""
        api = self._api
        batch, q_len, heads, head_dim = q.shape
        head_dim_v = v.shape[-1]
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)
        out = torch.empty(batch, q_len, heads, head_dim_v, dtype=q.dtype, device=q.device)
        lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device) if return_lse else None
        key = (q.dtype, head_dim, head_dim_v, heads // k.shape[2], causal, return_lse,
               api.get_broadcast_dims(q), api.get_broadcast_dims(k), api.get_broadcast_dims(v))
        self._launch(key, q, k, v, out, lse, scale, causal)
        return out, lse

    def can_launch_varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing) -> bool:
        """Whether `launch_varlen` runs this varlen call exactly as `_flash_attn_fwd` would (see the module
        docstring): (total, H, D) tensors as `can_launch` takes them, and a packing `varlen_packing_fits`."""
        return (varlen_packing_fits(self._api, q, k, v, packing)
                and self.can_launch(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)))

    def launch_varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing, scale: float | None,
                      causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(out (total_q, H, Dv) in q's dtype, lse (H, total_q) float32) of a varlen call `can_launch_varlen`
        accepted; on the current CUDA device's current stream."""
        api = self._api
        total_q, heads, head_dim = q.shape
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)
        out = torch.empty(total_q, heads, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(heads, total_q, dtype=torch.float32, device=q.device)
        key = ("varlen", q.dtype, head_dim, v.shape[-1], heads // k.shape[1], causal,
               api.get_broadcast_dims(q), api.get_broadcast_dims(k), api.get_broadcast_dims(v))
        self._launch(key, q, k, v, out, lse, scale, causal, packing.cu_seqlens_q, packing.cu_seqlens_k)
        return out, lse

    def _launch(self, key, q, k, v, out, lse, scale, causal, cu_q=None, cu_k=None) -> None:
        """The kernel of shape class `key` (compiled on first use) on these tensors; cu_seqlens for varlen."""
        kernel = self._compiled.get(key)
        if kernel is None:
            kernel = self._compiled[key] = self._compile(q, k, v, out, lse, scale, causal, (cu_q, cu_k))
        # after (q, k, v, out, lse, scale): the positional list `_flash_attn_fwd` of the checked releases passes
        # for a call without the features the module docstring names (each None, the aux data empty), the
        # cu_seqlens first (None for a dense call)
        kernel(q.detach(), k.detach(), v.detach(), out, lse, scale, cu_q, cu_k, None, None, None, None, None, None,
               None, self._api.AuxData(None, None), None, None)

    def _compile(self, q, k, v, out, lse, scale, causal, cu_seqlens=(None, None)):
        """As `_flash_attn_fwd` compiles a dense sm90 call, or a varlen one given `cu_seqlens` (see the module
        docstring)."""
        api = self._api
        head_dim, head_dim_v = q.shape[-1], v.shape[-1]
        per_kv_head = q.shape[-2] // k.shape[-2]
        config = api._tile_size_fwd_sm90(head_dim, head_dim_v, causal, False)
        kernel = api.FlashAttentionForwardSm90(
            api.torch2cute_dtype_map[q.dtype], head_dim, head_dim_v, per_kv_head, is_causal=causal, is_local=False,
            pack_gqa=per_kv_head > 1, tile_m=config.m_block_size, tile_n=config.n_block_size, num_stages=2,
            num_threads=384, Q_in_regs=False, intra_wg_overlap=config.intra_wg_overlap,
            mma_pv_is_rs=config.mma_pv_is_rs, mask_mod=None, score_mod=None, has_aux_tensors=False,
            q_subtile_factor=1, paged_kv_non_tma=False)
        tensors = [api.to_cute_tensor(t) for t in (q, k, v)]
        tensors.append(api.to_cute_tensor(out, assumed_align=_ALIGN_BYTES))
        tensors.append(api.to_cute_tensor(lse, assumed_align=4) if lse is not None else None)
        cu_q, cu_k = (api.to_cute_tensor(t, assumed_align=4, leading_dim=0) if t is not None else None
                      for t in cu_seqlens)
        stream = api.cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)
        return api.cute.compile(kernel, *tensors, scale, cu_q, cu_k, None, None, None, None, None, None, None,
                                api.AuxData(None, None), None, None, stream, options="--enable-tvm-ffi")


def varlen_packing_fits(api: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing) -> bool:
    """What both varlen launches (forward here, backward in fa4_sm90_backward) ask of a call's shapes and
    packing: 3-D (total, H, D) tensors at head dims VARLEN_CHECKED_HEAD_DIMS, int32 cu_seqlens of one length on
    their device, contiguous and 4-byte aligned (as the library compiles them), and no more sequences than
    `api`'s limit for its plain scheduler (above it the library builds a tile-count aid these launches do not)."""
    limit = getattr(api, VARLEN_LIMIT_NAME, None)
    cu_q, cu_k = packing.cu_seqlens_q, packing.cu_seqlens_k
    if not isinstance(limit, int) or q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        return False
    if q.shape[-1] not in VARLEN_CHECKED_HEAD_DIMS or v.shape[-1] not in VARLEN_CHECKED_HEAD_DIMS:
        return False
    return (cu_q.dtype == cu_k.dtype == torch.int32 and cu_q.device == cu_k.device == q.device
            and cu_q.shape == cu_k.shape and cu_q.shape[0] - 1 <= limit
            and cu_q.stride(0) == cu_k.stride(0) == 1 and cu_q.data_ptr() % 4 == 0 and cu_k.data_ptr() % 4 == 0)


def _has_kernel_layout(t: torch.Tensor) -> bool:
    """The layout the kernel assumes, for a 4-D fp16/bf16 tensor (8 elements are 16 bytes): last dim contiguous,
    address and other strides 16-byte aligned (stride 0, a broadcast dim, is allowed: it is part of the compile
    key). Written out, not looped: the provider asks this three times per call."""
    s = t.stride()
    return s[3] == 1 and t.data_ptr() % _ALIGN_BYTES == 0 and s[0] % 8 == 0 and s[1] % 8 == 0 and s[2] % 8 == 0
