"""A second merge written independently of cpattn's, for tests: all partial results at once, in one log-sum-exp
(it rounds once where the ring's pairwise merges round W - 1 times)."""

from __future__ import annotations

import torch


def merge_many(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge any number of partial (out (B, H, S, Dv), lse (B, H, S)) results; float32; empty rows: out 0, lse -inf."""
    lse = torch.stack([x.float() for x in lses])  # (N, B, H, S)
    peak = lse.amax(dim=0)
    peak = torch.where(torch.isneginf(peak), 0.0, peak)
    weights = torch.exp(lse - peak)
    z = weights.sum(dim=0)
    total = torch.where(z == 0, float("-inf"), peak + torch.log(z))
    weights = weights / z.clamp_min(torch.finfo(torch.float32).tiny)
    out = sum(o.float() * weights[i].unsqueeze(-1) for i, o in enumerate(outs))
    return out, total
