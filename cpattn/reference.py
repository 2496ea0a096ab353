"""A float64 reference of attention, the ground truth that every provider and schedule is tested against."""

from __future__ import annotations

import torch

from .contract import default_scale, expand_kv
from .ops.window import local_band_mask


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    window: "tuple[int | None, int | None] | None" = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in float64 on (B, H, S, D) tensors with GQA, masks, causal (top-left), a window
    (left, right) (query i sees key j iff i - left <= j <= i + right; with is_causal the right side is 0),
    a softcap (scores become softcap * tanh(scores / softcap) before masking) and sinks ((Hq,) logits in each
    row's denominator).

    Returns (out float64, lse float64 of shape (B, Hq, Sq)); lse includes the sinks; rows that see no key (and
    no sink) give out 0 and lse -inf. Differentiable, so tests take reference gradients from it with autograd.
    """
    q, k, v = (t.to(torch.float64) for t in (query, key, value))
    groups = q.shape[1] // k.shape[1]
    k, v = expand_kv(k, groups), expand_kv(v, groups)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask.to(scores.device), float("-inf"))
        else:
            scores = scores + attn_mask.to(device=scores.device, dtype=torch.float64)
    if is_causal or window is not None:
        left, right = window if window is not None else (None, None)
        if is_causal:
            right = 0 if right is None else min(right, 0)
        allowed = local_band_mask(q.shape[2], k.shape[2], (left, right), q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:  # one more column: the sink's logit, with a value of zero
        sink = sinks.to(torch.float64).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink], dim=-1)
        v = torch.cat([v, v.new_zeros(*v.shape[:2], 1, v.shape[3])], dim=2)
    # Rows that see no key get finite stand-in scores: logsumexp's backward at -inf is NaN, which an additive
    # mask (unlike masked_fill) would pass on to the gradients of q and k.
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse).masked_fill(empty, 0.0)
    return probs @ v, lse.masked_fill(empty, float("-inf")).squeeze(-1)
