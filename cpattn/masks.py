"""Attention masks: conversions between the boolean and additive forms, and slicing by key positions.

SDPA semantics throughout: a boolean mask is True where a query may attend; a float mask is added to the
scores (``-inf`` hides a key). Masks broadcast to ``(B, H, Sq, Sk)``.
"""

from __future__ import annotations

import torch


def as_additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Float mask in `dtype` (0 where allowed, -inf where hidden); additive masks are only cast."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return out.masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def allowed(mask: torch.Tensor) -> torch.Tensor:
    """Boolean view of a mask: where a key is not hidden."""
    return mask if mask.dtype == torch.bool else mask > float("-inf")


def open_empty_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask in which rows that see no key see every key, those rows (..., S_q, 1) bool).

    Kernels disagree on rows that see no key: SDPA's cuDNN backend gave garbage outputs and NaN gradients there
    on an H100. With the rows opened, a kernel computes finite values on them and the caller zeroes them in the
    output. The zeroed rows pass no gradient back, so their dQ and their share of dK and dV are exactly 0, which
    is what the reference (and every cpattn provider) gives for a row with no key. Costs a reduction and an
    elementwise pass over the mask, no sync."""
    empty = ~allowed(mask).any(dim=-1, keepdim=True)
    return (mask | empty if mask.dtype == torch.bool else mask.masked_fill(empty, 0.0)), empty


def select_keys(mask: torch.Tensor | None, keys: slice | torch.Tensor) -> torch.Tensor | None:
    """The columns of a (local rows x all keys) mask that belong to one KV block, keeping broadcast dims."""
    if mask is None:
        return None
    if mask.shape[-1] == 1:  # broadcast over keys
        return mask
    if isinstance(keys, slice):
        return mask[..., keys]
    return mask.index_select(-1, keys.to(mask.device))


def select_queries(mask: torch.Tensor | None, rows: slice | torch.Tensor) -> torch.Tensor | None:
    """The rows of a mask that belong to some of the local queries, keeping broadcast dims."""
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    if isinstance(rows, slice):
        return mask[..., rows, :]
    return mask.index_select(-2, rows.to(mask.device))


def expand_to_4d(mask: torch.Tensor) -> torch.Tensor:
    """View a mask with fewer than 4 dims as 4-D, as SDPA broadcasting does (leading dims of size 1)."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def is_mask_mod(mask) -> bool:
    """A flex-style callable `mask_mod(b, h, q_idx, kv_idx) -> bool` given as attn_mask."""
    return mask is not None and not isinstance(mask, torch.Tensor) and callable(mask)


def materialize_mask_mod(mask_mod, batch: int, heads: int, q_positions: torch.Tensor,
                         kv_positions: torch.Tensor) -> torch.Tensor:
    """Evaluate a mask_mod on broadcast index grids: a bool mask (B|1, H|1, Sq, Sk) in global positions.

    Indices broadcast as (B,1,1,1), (1,H,1,1), (Sq,1) and (1,Sk), so a mask_mod that ignores b or h comes
    back with size 1 there (nothing is expanded), and the same function gives the same mask on every rank for
    its own query positions. The mask_mod must be written with elementwise tensor ops (as flex requires).
    """
    device = q_positions.device
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q = q_positions.view(1, 1, -1, 1)
    kv = kv_positions.to(device).view(1, 1, 1, -1)
    out = torch.as_tensor(mask_mod(b, h, q, kv), device=device)
    if out.dtype != torch.bool:
        raise TypeError(f"mask_mod must return a bool tensor, got {out.dtype}")
    return expand_to_4d(out).expand(-1, -1, q_positions.numel(), kv_positions.numel())
