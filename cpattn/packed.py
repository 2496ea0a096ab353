"""`flash_varlen_attention`: attention over packed sequences, on the `flash_varlen` provider, with autograd.

The packed form of the public API: q, k, v are (total, H, D) tensors holding several sequences one after
another, their boundaries in int32 cu_seqlens. This module checks the packed arguments, reads the
context-parallel state `attention_provider` set, and runs either one varlen kernel call
(`FlashVarlen.packed_attention`) or, under context parallelism, the packed schedule (cpattn/cp/packed.py) with
that call as its kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from .contract import AttentionCall, default_scale
from .state import current_state
from .errors import InvalidArgumentError, UnsupportedInputError
from .providers import get_provider
from .providers.flash import Packing


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
    _check_packed_tensors(q, k, v)
    cp = current_state().cp
    if cp is not None and cp.world_size > 1:
        return _packed_under_cp(cp, get_provider("flash_varlen"), q, k, v, cu_seqlens_q, cu_seqlens_k,
                                max_seqlen_q, max_seqlen_k, is_causal, scale)
    _check_sequences(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal)
    provider = get_provider("flash_varlen")
    provider.require_available()  # a missing library is ProviderUnavailableError, as for any provider
    view = _packed_view(q, k, v, is_causal, scale)
    reasons = provider.reasons(view)
    if reasons:
        raise UnsupportedInputError("flash_varlen_attention", reasons)
    packing = Packing(cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), int(max_seqlen_q), int(max_seqlen_k))
    return provider.packed_attention(q, k, v, packing, view.scale, view.is_causal)


def _packed_view(q, k, v, is_causal, scale) -> AttentionCall:
    """The call as (1, H, total, D) views of the packed tensors: what the provider's checks and the
    context-parallel front read."""
    return AttentionCall(
        q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), v.unsqueeze(0).transpose(1, 2),
        is_causal=bool(is_causal), scale=default_scale(q.shape[-1]) if scale is None else float(scale),
        enable_gqa=q.shape[1] != k.shape[1],
    )


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

    def kernel(qc, kc, vc, cu_q, cu_k, max_q, max_k):  # bottom-right causal, as the schedule needs
        return provider.packed_attention(qc, kc, vc, Packing(cu_q, cu_k, max_q, max_k), view.scale, view.is_causal)

    return cp.run_packed(provider, view, kernel, cu_seqlens_q.tolist())


def _check_sequences(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal) -> None:
    """The cu_seqlens and maximum lengths of a single-device call, against q and k and each other."""
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


__all__ = ["flash_varlen_attention"]
