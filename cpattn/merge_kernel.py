"""The ring's merge step as one Triton kernel: a float32 accumulator absorbs a block's (out, lse) in place.

`cpattn.merge.merge_two` spells the merge out in torch ops: about fifteen elementwise kernels per block, three
of them passes over the (B, H, S, Dv) output, plus a copy back when the block covered only some rows (zigzag).
Here one program loads a tile of rows of both outputs and both log-sum-exps, merges them in registers with the
same guarded arithmetic, and writes the accumulator where it lies (a row slice of it is just a strided view).
Only `cpattn.merge` calls this; it falls back to the torch ops wherever Triton is missing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .merge import _TINY


@triton.jit
def _merge_rows(
    acc_out, acc_lse, blk_out, blk_lse,
    heads, rows, dim,
    ao_b, ao_h, ao_s, ao_d,
    al_b, al_h, al_s,
    bo_b, bo_h, bo_s, bo_d,
    bl_b, bl_h, bl_s,
    TINY: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // heads, bh % heads
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    in_rows = s < rows
    in_tile = in_rows[:, None] & (d < dim)[None, :]

    la = tl.load(acc_lse + b * al_b + h * al_h + s * al_s, mask=in_rows, other=float("-inf"))
    lb = tl.load(blk_lse + b * bl_b + h * bl_h + s * bl_s, mask=in_rows, other=float("-inf")).to(tl.float32)
    # The guards of merge_two: shift by the row maximum, by 0 where both are -inf (an empty row), so empty
    # rows get weights 0, output 0 and lse -inf. A NaN in either lse reaches both weights and stays NaN.
    m = tl.where(la > lb, la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    z = wa + wb
    lse = tl.where(z == 0.0, float("-inf"), m + tl.log(z))
    inv_z = 1.0 / tl.maximum(z, TINY)

    a_ptr = acc_out + b * ao_b + h * ao_h + s[:, None] * ao_s + d[None, :] * ao_d
    b_ptr = blk_out + b * bo_b + h * bo_h + s[:, None] * bo_s + d[None, :] * bo_d
    oa = tl.load(a_ptr, mask=in_tile, other=0.0)
    ob = tl.load(b_ptr, mask=in_tile, other=0.0).to(tl.float32)
    out = oa * (wa * inv_z)[:, None] + ob * (wb * inv_z)[:, None]
    tl.store(a_ptr, out, mask=in_tile)
    tl.store(acc_lse + b * al_b + h * al_h + s * al_s, lse, mask=in_rows)


def merge_into(acc_out: torch.Tensor, acc_lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor) -> None:
    """acc (float32 (B, H, S, Dv) and (B, H, S), any strides) <- merge(acc, block), in place, one launch."""
    batch, heads, rows, dim = acc_out.shape
    if rows == 0 or batch * heads == 0:
        return
    block_d = triton.next_power_of_2(dim)
    block_s = max(1, min(64, 4096 // block_d))  # a tile of at most 4096 float32 values per operand
    grid = (triton.cdiv(rows, block_s), batch * heads)
    _merge_rows[grid](
        acc_out, acc_lse, blk_out, blk_lse,
        heads, rows, dim,
        *acc_out.stride(), *acc_lse.stride(), *blk_out.stride(), *blk_lse.stride(),
        TINY=_TINY, BLOCK_S=block_s, BLOCK_D=block_d,
    )
