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
    return optional_kernel("merge_kernel", "merge_rows_into")


def _fuse_on(acc_out: torch.Tensor) -> bool:
    """Where the Triton merge runs: CUDA tensors (tests/merge_kernel_check.py widens it to CPU tensors under
    Triton's interpreter)."""
    return acc_out.is_cuda


def merge_rows(acc_out: torch.Tensor, acc_lse: torch.Tensor, rows: slice, out_b: torch.Tensor, lse_b: torch.Tensor,
               out_dtype: torch.dtype = torch.float32, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The accumulator (out, lse) with a block merged on `rows`: (out in `out_dtype`, lse float32).

    `in_place` (a float32 accumulator the caller owns, a float32 result): only the block's rows are written,
    into the accumulator itself. Otherwise the result is new storage over every row, the accumulator is left as
    it was, and may be in any dtype and strides (a provider's first block, kept as it came). On CUDA with Triton
    either is one kernel; elsewhere `merge_two` and copies."""
    in_place = in_place and out_dtype == acc_out.dtype == acc_lse.dtype == torch.float32
    fused = _fused_merge() if _fuse_on(acc_out) else None
    if in_place:
        out_view, lse_view = acc_out[:, :, rows], acc_lse[:, :, rows]
        if fused is not None:
            fused(out_view, lse_view, out_view, lse_view, out_b, lse_b, 0)
        else:
            merged_out, merged_lse = merge_two(out_view, lse_view, out_b, lse_b)
            out_view.copy_(merged_out)
            lse_view.copy_(merged_lse)
        return acc_out, acc_lse
    if fused is not None:
        out = torch.empty(acc_out.shape, dtype=out_dtype, device=acc_out.device)
        lse = torch.empty(acc_lse.shape, dtype=torch.float32, device=acc_lse.device)
        fused(out, lse, acc_out, acc_lse, out_b, lse_b, rows.start)
        return out, lse
    out = acc_out.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    lse = acc_lse.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    out[:, :, rows], lse[:, :, rows] = merge_two(out[:, :, rows], lse[:, :, rows], out_b, lse_b)
    return out.to(out_dtype), lse


def _shifted_max(m: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isneginf(m), 0.0, m)


class PartialAttention:
    """A running (out, lse) that absorbs one block result after another (the ring's accumulator).

    A first block that covers every row is kept as the provider returned it, in its dtype and strides (a
    provider's results are new tensors its caller owns): no copy. The first merge writes new float32 storage,
    never the kept block's; later merges update that storage in place on their rows; and a merge told
    `out_dtype` (the ring's last) writes the result in that dtype, so nothing casts afterwards. Rounding happens
    once either way: a kept bf16 block is exact, and every merge computes in float32.
    Made with `for_rows`, it allocates nothing until the first block; a first block over some rows only merges
    into out 0, lse -inf.
    """

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self._shape: tuple | None = None  # (batch, heads, q_len, value_dim, device) for `for_rows`
        self._owned = False  # out and lse are float32 storage this accumulator allocated (merged into in place)

    @classmethod
    def empty(cls, batch: int, heads: int, q_len: int, value_dim: int, device) -> "PartialAttention":
        """An accumulator that has seen no key yet: out 0, lse -inf (merging into it is exact)."""
        acc = cls()
        acc.out = torch.zeros(batch, heads, q_len, value_dim, dtype=torch.float32, device=device)
        acc.lse = torch.full((batch, heads, q_len), float("-inf"), dtype=torch.float32, device=device)
        acc._owned = True
        return acc

    @classmethod
    def for_rows(cls, batch: int, heads: int, q_len: int, value_dim: int, device) -> "PartialAttention":
        """An accumulator of this shape whose storage comes with the first block (see the class docstring)."""
        acc = cls()
        acc._shape = (batch, heads, q_len, value_dim, device)
        return acc

    def add(self, out_b: torch.Tensor, lse_b: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> None:
        """Merge a block that covers every query row."""
        self.add_rows(slice(0, out_b.shape[2]), out_b, lse_b, out_dtype)

    def add_rows(self, rows: slice, out_b: torch.Tensor, lse_b: torch.Tensor,
                 out_dtype: torch.dtype = torch.float32) -> None:
        """Merge a block that covers some query rows (zigzag steps where only the later half attends).
        `out_dtype`: the dtype the accumulator holds afterwards; float32 while more blocks follow."""
        if self.out is None:
            q_len = out_b.shape[2] if self._shape is None else self._shape[2]
            if rows.start == 0 and rows.stop == q_len:
                self.out, self.lse = out_b, lse_b.float()  # kept (see the class docstring)
                return
            assert self._shape is not None, "start from empty() or for_rows(), or add a block covering every row"
            self.out, self.lse = PartialAttention.empty(*self._shape).value()
            self._owned = True
        self.out, self.lse = merge_rows(self.out, self.lse, rows, out_b, lse_b, out_dtype, self._owned)
        self._owned = self.out.dtype == torch.float32

    def value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (out, lse) so far, both float32; out 0 and lse -inf for an accumulator of `for_rows` that saw
        nothing."""
        return self.result(torch.float32)

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(out in `dtype`, lse float32): the accumulator's own tensors where out has that dtype already."""
        if self.out is None:
            assert self._shape is not None, "no block was added"
            empty = PartialAttention.empty(*self._shape)
            return empty.out.to(dtype), empty.lse
        return self.out.to(dtype), self.lse


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
