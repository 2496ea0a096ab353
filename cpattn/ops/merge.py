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


MAX_BLOCKS = 4  # blocks one Triton launch merges (cpattn/ops/merge_kernel.py); PartialAttention folds beyond that


def _fused_merge():
    """The one-launch Triton merge (cpattn/ops/merge_kernel.py: `merge_blocks_into(out, lse, [(out_b, lse_b, first
    row), ...])`), or None where Triton cannot be imported."""
    return optional_kernel("merge_kernel", "merge_blocks_into")


def _fuse_on(acc_out: torch.Tensor) -> bool:
    """Where the Triton merge runs: CUDA tensors (tests/support/merge_kernel_check.py widens it to CPU tensors under
    Triton's interpreter)."""
    return acc_out.is_cuda


def _shifted_max(m: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isneginf(m), 0.0, m)


class PartialAttention:
    """A running (out, lse) over query rows that absorbs block results (the ring's accumulator).

    The blocks are kept as the provider returned them, in their dtype and strides (a provider's results are new
    tensors its caller owns), and merged when `result` asks: up to MAX_BLOCKS in one pass that reads each block
    once and writes the result once, in the dtype asked for. Merging as blocks arrive would read and write a
    float32 accumulator once per block instead (at W=4 zigzag blocks about 11 passes of the output's size
    against 4). A block arriving when MAX_BLOCKS are held first folds them into float32 storage, so at most
    MAX_BLOCKS are held: up to W=4 that is about the memory of a float32 accumulator and one block. Rounding to
    the result dtype happens once. Rows no block covers come out as out 0, lse -inf; nothing is allocated before
    the result is asked for.
    """

    def __init__(self, batch: int, heads: int, q_len: int, value_dim: int, device) -> None:
        self._shape = (batch, heads, q_len, value_dim)
        self._device = device
        self._blocks: list[tuple[slice, torch.Tensor, torch.Tensor]] = []  # (rows, out, lse), in arrival order

    def add(self, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
        """Add a block that covers every query row."""
        self.add_rows(slice(0, self._shape[2]), out_b, lse_b)

    def add_rows(self, rows: slice, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
        """Add a block that covers some query rows (zigzag steps where only the later half attends). The block is
        kept, not copied: the caller must not write to it afterwards."""
        if len(self._blocks) == MAX_BLOCKS:  # a full hand folds when one more comes, not before: the last fold
            self._fold(torch.float32)  # of a ring then writes the result dtype itself
        self._blocks.append((rows, out_b, lse_b))

    def value(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (out, lse) so far, both float32."""
        return self.result(torch.float32)

    def result(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(out in `dtype`, lse float32): a lone block that covers every row as it is (cast where needed). With
        `out` (the result's shape and `dtype`, any strides, e.g. a transposed view of the caller's layout), the
        merge writes there, so the caller needs no copy into its layout; a lone block is copied there."""
        lone = self.lone_block()
        if out is not None and lone is not None:
            out.copy_(lone[0])
            return out, lone[1].float()
        if lone is None:
            self._fold(dtype, out)
        _, merged, lse = self._blocks[0]
        return merged.to(dtype), lse.float()

    def result_in_first(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(out, lse) merged into the first block's own storage, where that block covers every row, is in
        `dtype` with a float32 lse, and the others fit one launch: only the rows from the others' first row to
        their last are read and written (a packed ring whose diagonal chain covers the shard, and another chain
        a few of its documents). A row the other blocks miss keeps the first block's values, as `lone_block`
        does, so the result is the bits `result(dtype)` gives wherever the first block has out 0 on its rows of
        lse -inf (the contract's empty rows). The caller must own the first block (a kernel's output it does
        not keep elsewhere). None where this does not apply: nothing is changed then."""
        if len(self._blocks) < 2 or len(self._blocks) > MAX_BLOCKS:
            return None
        rows0, out0, lse0 = self._blocks[0]
        if not self._covers_all(rows0) or out0.dtype != dtype or lse0.dtype != torch.float32:
            return None
        others = self._blocks[1:]
        hull = slice(min(r.start for r, _, _ in others), max(r.stop for r, _, _ in others))
        dest, dest_lse = out0[:, :, hull], lse0[:, :, hull]  # the first block is its own destination
        _merge_into(dest, dest_lse, [(dest, dest_lse, 0)] + [(o, l, r.start - hull.start) for r, o, l in others])
        self._blocks = [(rows0, out0, lse0)]
        return out0, lse0

    def first_block(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(out, lse) of the first block held, as it was added, or None before any."""
        return (self._blocks[0][1], self._blocks[0][2]) if self._blocks else None

    def lone_block(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(out, lse) of the one block held where it covers every row (the result as it is), else None."""
        if len(self._blocks) == 1 and self._covers_all(self._blocks[0][0]):
            return self._blocks[0][1], self._blocks[0][2]
        return None

    def _covers_all(self, rows: slice) -> bool:
        return rows.start == 0 and rows.stop == self._shape[2]

    def _fold(self, dtype: torch.dtype, into: torch.Tensor | None = None) -> None:
        """Merge the blocks held into new storage over every row (or `into`), which becomes the one block held."""
        b, h, s, _ = self._shape
        out = torch.empty(self._shape, dtype=dtype, device=self._device) if into is None else into
        lse = torch.empty(b, h, s, dtype=torch.float32, device=self._device)
        _merge_into(out, lse, [(o, l, rows.start) for rows, o, l in self._blocks])
        self._blocks = [(slice(0, s), out, lse)]


def _merge_into(out: torch.Tensor, lse: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
    """(out, lse) <- the merge of `blocks` (out_b, lse_b, first row in `out`), rounded once into out's dtype:
    the Triton merge where it runs (`out` may be the first block itself), else merge_two from out 0, lse -inf
    (exact: the first block comes through as it is), in new float32 storage copied back at the end."""
    fused = _fused_merge() if blocks and _fuse_on(out) else None
    if fused is not None:
        fused(out, lse, blocks)
        return
    total = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    total_lse = torch.full(lse.shape, float("-inf"), dtype=torch.float32, device=lse.device)
    for o, l, first in blocks:
        rows = slice(first, first + o.shape[2])
        total[:, :, rows], total_lse[:, :, rows] = merge_two(total[:, :, rows], total_lse[:, :, rows], o, l)
    out.copy_(total)
    lse.copy_(total_lse)


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


def merge_stacked(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge N partial results stacked on dim 0 (outs (N, B, H, S, Dv), lses (N, B, H, S)) in one pass: every
    exponent shifted by the row maximum over the N (0 where it is -inf), so rows no partial covers give out 0 and
    lse -inf and nothing divides by zero. Rounds once, where N - 1 pairwise merges would round N - 1 times."""
    lses = lses.float()
    peak = _shifted_max(lses.amax(dim=0))
    weights = torch.exp(lses - peak)
    total = weights.sum(dim=0)
    lse = torch.where(total == 0, float("-inf"), peak + torch.log(total))
    weights = weights / total.clamp_min(_TINY)
    out = (outs.float() * weights.unsqueeze(-1)).sum(dim=0)
    return out, lse


def pack_partial(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """A partial (out (B, H, S, Dv), lse (B, H, S)) as one float32 (B, H, S, Dv + 1) buffer, lse last: what
    decode's combine all-gathers (one message per rank). One Triton launch on CUDA."""
    kernel = optional_kernel("merge_kernel", "pack_partial")
    if kernel is not None and _fuse_on(out):
        return kernel(out, lse)
    return torch.cat([out.float(), lse.float().unsqueeze(-1)], dim=-1).contiguous()


def merge_packed(gathered: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in `dtype`, lse float32) of N packed partials stacked on dim 0 ((N, B, H, S, Dv + 1), `pack_partial`'s
    form): `merge_stacked`'s arithmetic, in one Triton launch on CUDA (the torch ops take a dozen)."""
    kernel = optional_kernel("merge_kernel", "merge_packed")
    if kernel is not None and _fuse_on(gathered):
        return kernel(gathered.contiguous(), dtype)
    out, lse = merge_stacked(gathered[..., :-1], gathered[..., -1])
    return out.to(dtype), lse

