"""Attention sinks through the log-sum-exp: exact, for any kernel that returns one.

A sink is one logit s per query head that joins every row's softmax denominator and contributes no value.
For a row whose real keys give output O and log-sum-exp L:

    T = logaddexp(L, s)        (the row's log-sum-exp with the sink)
    out = O * exp(L - T)

Under context parallelism the partial (O, L) of every block and rank merge first, as without sinks; the sink
enters once, with the global L. The backward is the usual one with T as the row's log-sum-exp and `out` as its
output (the probabilities of real keys are exp(S - T)); the sink's own gradient is

    d s = -sum over rows of exp(s - T) * rowsum(dout * out)

the same row sum every flash backward computes. A row that sees no key has L = -inf, so T = s and out = 0.
"""

from __future__ import annotations

import torch


def _accumulation(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 results, float32 otherwise. A float64 output rounded to float32 here would carry that
    rounding into the backward's rowsum(dout * out), where it cancels badly: errors of 1e-6 instead of 1e-7."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sink_logits(sinks: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(H,) sinks as (1, H, 1) in `dtype`, broadcasting against (B, H, S) log-sum-exps."""
    return sinks.detach().to(dtype).view(1, -1, 1)


def add_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out with the sinks in its denominator, in out's dtype; T float32) from a result (out, lse) without them."""
    acc = _accumulation(out)
    total = torch.logaddexp(lse.to(acc), sink_logits(sinks, acc))
    both_empty = torch.isneginf(total)  # no key and a sink of -inf: nothing to attend, out 0
    weight = torch.where(both_empty, 0.0, torch.exp(lse.to(acc) - total))
    return (out.to(acc) * weight.unsqueeze(-1)).to(out.dtype), total.float()


def sink_grad(dout: torch.Tensor, out: torch.Tensor, total: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """d loss / d sinks, shape (H,) in sinks' dtype, from these rows alone (a rank's share under context
    parallelism: the replicated parameter's gradient all-reduce adds the shares)."""
    acc = _accumulation(out)
    rowsum = (dout.to(acc) * out.to(acc)).sum(dim=-1)  # (B, H, S)
    total = total.to(acc)
    share = torch.where(torch.isneginf(total), 0.0, torch.exp(sink_logits(sinks, acc) - total))
    return (-(share * rowsum).sum(dim=(0, 2))).to(sinks.dtype)
