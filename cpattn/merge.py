"""Merging partial attention results through their log-sum-exp, in float32, without ever making NaN.

Attention over keys split into blocks b is exactly recovered from each block's output o_b and log-sum-exp
l_b:  l = log(sum_b exp(l_b)),  o = sum_b exp(l_b - l) * o_b.
The textbook incremental form (``o -= sigmoid(l_b - l) * (o - o_b)``) turns into NaN when the running l is
-inf (a block where a row saw no key) and is poisoned by +inf. Here every exponent is shifted by the row
maximum m, with m replaced by 0 where it is -inf, so an all-empty row gives weights 0, output 0 and
log-sum-exp -inf; nothing divides by zero.
"""

from __future__ import annotations

import torch

from .triton_kernels import optional_kernel

_TINY = torch.finfo(torch.float32).tiny


def _fused_merge():
    """The one-launch Triton merge (cpattn/merge_kernel.py), or None where Triton cannot be imported."""
    return optional_kernel("merge_kernel", "merge_into")


def _fuse_on(acc_out: torch.Tensor) -> bool:
    """Where the Triton merge runs: CUDA tensors (tests/merge_kernel_check.py widens it to CPU tensors under
    Triton's interpreter)."""
    return acc_out.is_cuda


def merge_into(acc_out: torch.Tensor, acc_lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Merge a block into a float32 (out, lse) accumulator in place; `acc_*` may be row slices (views).

    On CUDA with Triton this is one kernel; elsewhere `merge_two` plus a copy into the views."""
    fused = _fused_merge() if _fuse_on(acc_out) else None
    if fused is not None and acc_out.dtype == acc_lse.dtype == torch.float32:
        fused(acc_out, acc_lse, out_b, lse_b)
        return
    out, lse = merge_two(acc_out, acc_lse, out_b, lse_b)
    acc_out.copy_(out)
    acc_lse.copy_(lse)


def _shifted_max(m: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isneginf(m), 0.0, m)


class PartialAttention:
    """A running float32 (out, lse) that absorbs one block result after another (the ring's accumulator).

    Always owns fresh float32 storage: the first block is copied, never aliased, so a reused communication
    buffer or a float32 input can never be overwritten through it. Made with `for_rows`, it allocates nothing
    until the first block: one that covers every row is copied (the merge into out 0, lse -inf would give the
    same values), which saves a ring two fills and one merge per rank.
    """

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self._shape: tuple | None = None  # (batch, heads, q_len, value_dim, device) for `for_rows`

    @classmethod
    def empty(cls, batch: int, heads: int, q_len: int, value_dim: int, device) -> "PartialAttention":
        """An accumulator that has seen no key yet: out 0, lse -inf (merging into it is exact)."""
        acc = cls()
        acc.out = torch.zeros(batch, heads, q_len, value_dim, dtype=torch.float32, device=device)
        acc.lse = torch.full((batch, heads, q_len), float("-inf"), dtype=torch.float32, device=device)
        return acc

    @classmethod
    def for_rows(cls, batch: int, heads: int, q_len: int, value_dim: int, device) -> "PartialAttention":
        """An accumulator of this shape whose storage comes with the first block (see the class docstring)."""
        acc = cls()
        acc._shape = (batch, heads, q_len, value_dim, device)
        return acc

    def add(self, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
        if self.out is None:
            self.out = out_b.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            self.lse = lse_b.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            return
        self.out, self.lse = merge_two(self.out, self.lse, out_b, lse_b)

    def add_rows(self, rows: slice, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
        """Merge a block that covered only some query rows (zigzag steps where only the later half attends),
        in place: the accumulator keeps its storage."""
        if self.out is None:
            assert self._shape is not None, "start from empty() or for_rows(), or add a block covering every row"
            if rows.start == 0 and rows.stop == self._shape[2]:
                self.add(out_b, lse_b)
                return
            self.out, self.lse = PartialAttention.empty(*self._shape).value()
        merge_into(self.out[:, :, rows], self.lse[:, :, rows], out_b, lse_b)

    def value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 (out, lse) so far; out 0 and lse -inf for an accumulator of `for_rows` that saw nothing."""
        if self.out is None:
            assert self._shape is not None, "no block was added"
            return PartialAttention.empty(*self._shape).value()
        return self.out, self.lse

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = self.value()
        return out.to(dtype), lse


def merge_two(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results (out: (B, H, S, Dv), lse: (B, H, S)); returns float32 (out, lse)."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    m = _shifted_max(torch.maximum(lse_a, lse_b))
    w_a = torch.exp(lse_a - m)
    w_b = torch.exp(lse_b - m)
    z = w_a + w_b
    lse = torch.where(z == 0, float("-inf"), m + torch.log(z))  # a NaN input row stays NaN, never "empty"
    inv_z = 1.0 / z.clamp_min(_TINY)
    out = out_a.float() * (w_a * inv_z).unsqueeze(-1) + out_b.float() * (w_b * inv_z).unsqueeze(-1)
    return out, lse


def merge_many(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge any number of partial results at once (rounds once, unlike W-1 pairwise merges)."""
    lse = torch.stack([x.float() for x in lses])  # (N, B, H, S)
    m = _shifted_max(lse.amax(dim=0))
    w = torch.exp(lse - m)
    z = w.sum(dim=0)
    total = torch.where(z == 0, float("-inf"), m + torch.log(z))
    w = w / z.clamp_min(_TINY)
    out = sum(o.float() * w[i].unsqueeze(-1) for i, o in enumerate(outs))
    return out, total
