"""A float64 reference of attention, the ground truth that every provider and schedule is tested against."""

from __future__ import annotations

import torch

from .contract import causal_mask, default_scale, expand_kv


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in float64 on (B, H, S, D) tensors with GQA, masks and causal (top-left).

    Returns (out float64, lse float64 of shape (B, Hq, Sq)); rows that see no key give out 0 and lse -inf.
    Differentiable, so tests take reference gradients from it with autograd.
    """
    q, k, v = (t.to(torch.float64) for t in (query, key, value))
    groups = q.shape[1] // k.shape[1]
    k, v = expand_kv(k, groups), expand_kv(v, groups)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask.to(scores.device), float("-inf"))
        else:
            scores = scores + attn_mask.to(device=scores.device, dtype=torch.float64)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    # Rows that see no key get finite stand-in scores: logsumexp's backward at -inf is NaN, which an additive
    # mask (unlike masked_fill) would pass on to the gradients of q and k.
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).masked_fill(empty, 0.0)
    return probs @ v, lse.masked_fill(empty, float("-inf")).squeeze(-1)
