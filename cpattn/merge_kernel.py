"""The ring's merge step as one Triton kernel: an (out, lse) accumulator absorbs a block's (out, lse).

`cpattn.merge.merge_two` spells the merge out in torch ops: about fifteen elementwise kernels per block, three
of them passes over the (B, H, S, Dv) output, plus a copy back when the block covered only some rows (zigzag).
Here one program loads a tile of rows of the accumulator and, where the tile meets the block's rows, of the block;
merges them in registers with the same guarded arithmetic; and stores the tile once, in the destination's dtype.
Rows the block does not cover are stored as they were (converted). The destination may be the accumulator itself
(in place: the caller then passes only the block's rows) or new storage, which is how an accumulator that is still
a provider's first block in bf16 becomes float32, and how the last merge writes the result dtype directly.
Only `cpattn.merge` calls this; it falls back to the torch ops wherever Triton is missing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gradsum_kernel import _bf16_round_nearest_even
from .merge import _TINY


@triton.jit
def _merge_rows(
    out, out_lse, acc, acc_lse, blk, blk_lse,
    heads, rows, dim, start, blk_rows,
    o_b, o_h, o_s, o_d,
    ol_b, ol_h, ol_s,
    a_b, a_h, a_s, a_d,
    al_b, al_h, al_s,
    k_b, k_h, k_s, k_d,
    kl_b, kl_h, kl_s,
    TINY: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, OUT_BF16: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // heads, bh % heads
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    in_rows = s < rows
    in_tile = in_rows[:, None] & (d < dim)[None, :]
    p = s - start  # the row's index in the block
    in_blk = in_rows & (p >= 0) & (p < blk_rows)

    la = tl.load(acc_lse + b * al_b + h * al_h + s * al_s, mask=in_rows, other=float("-inf")).to(tl.float32)
    lb = tl.load(blk_lse + b * kl_b + h * kl_h + p * kl_s, mask=in_blk, other=float("-inf")).to(tl.float32)
    # The guards of merge_two: shift by the row maximum, by 0 where both are -inf (an empty row), so empty
    # rows get weights 0, output 0 and lse -inf. A NaN in either lse reaches both weights and stays NaN.
    m = tl.where(la > lb, la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    z = wa + wb
    lse = tl.where(z == 0.0, float("-inf"), m + tl.log(z))
    inv_z = 1.0 / tl.maximum(z, TINY)

    oa = tl.load(acc + b * a_b + h * a_h + s[:, None] * a_s + d[None, :] * a_d, mask=in_tile, other=0.0)
    oa = oa.to(tl.float32)
    ob = tl.load(blk + b * k_b + h * k_h + p[:, None] * k_s + d[None, :] * k_d, mask=in_blk[:, None] & in_tile,
                 other=0.0).to(tl.float32)
    merged = oa * (wa * inv_z)[:, None] + ob * (wb * inv_z)[:, None]
    result = tl.where(in_blk[:, None], merged, oa)  # rows outside the block: as they were (keeps -0.0)
    if OUT_BF16:
        result = _bf16_round_nearest_even(result)
    tl.store(out + b * o_b + h * o_h + s[:, None] * o_s + d[None, :] * o_d, result.to(out.dtype.element_ty),
             mask=in_tile)
    tl.store(out_lse + b * ol_b + h * ol_h + s * ol_s, tl.where(in_blk, lse, la), mask=in_rows)


def merge_rows_into(out: torch.Tensor, out_lse: torch.Tensor, acc: torch.Tensor, acc_lse: torch.Tensor,
                    blk: torch.Tensor, blk_lse: torch.Tensor, start: int) -> None:
    """(out, out_lse) <- acc with the block merged on rows [start, start + block rows), one launch.

    All (B, H, S, Dv) and (B, H, S), any strides; `acc` in any float dtype, `out` float32 or the result dtype,
    the lse float32. `out` may be `acc` itself (each element is read before it is written, by one program)."""
    batch, heads, rows, dim = acc.shape
    if rows == 0 or batch * heads == 0:
        return
    block_d = triton.next_power_of_2(dim)
    block_s = max(1, min(64, 4096 // block_d))  # a tile of at most 4096 float32 values per operand
    grid = (triton.cdiv(rows, block_s), batch * heads)
    _merge_rows[grid](
        out, out_lse, acc, acc_lse, blk, blk_lse,
        heads, rows, dim, start, blk.shape[2],
        *out.stride(), *out_lse.stride(), *acc.stride(), *acc_lse.stride(), *blk.stride(), *blk_lse.stride(),
        TINY=_TINY, BLOCK_S=block_s, BLOCK_D=block_d, OUT_BF16=out.dtype == torch.bfloat16,
    )
