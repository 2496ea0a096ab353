"""`cpattn.gradsum.add` as one Triton kernel: out = float32(total) + float32(part on a row range), stored in
out's dtype.

One program loads a tile of rows of `total` and, where the tile meets the part's rows, the matching rows of the
part (any strides: a kernel's gradient may be a transposed view), adds them in float32 and stores the tile once.
Only `cpattn.gradsum` calls this; it falls back to torch ops wherever Triton is missing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rows(
    out, total, part,
    heads, rows, dim, start, part_rows,
    o_b, o_h, o_s, o_d,
    t_b, t_h, t_s, t_d,
    p_b, p_h, p_s, p_d,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, OUT_BF16: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // heads, bh % heads
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    in_tile = (s < rows)[:, None] & (d < dim)[None, :]
    x = tl.load(total + b * t_b + h * t_h + s[:, None] * t_s + d[None, :] * t_d, mask=in_tile, other=0.0)
    p = s - start
    in_part = in_tile & ((p >= 0) & (p < part_rows))[:, None]
    y = tl.load(part + b * p_b + h * p_h + p[:, None] * p_s + d[None, :] * p_d, mask=in_part, other=0.0)
    x = x.to(tl.float32)
    result = tl.where(in_part, x + y.to(tl.float32), x)  # outside the part: x as it is (keeps -0.0)
    if OUT_BF16:
        result = _bf16_round_nearest_even(result)
    tl.store(out + b * o_b + h * o_h + s[:, None] * o_s + d[None, :] * o_d, result.to(out.dtype.element_ty),
             mask=in_tile)


@triton.jit
def _bf16_round_nearest_even(x):
    """float32 -> bfloat16 as torch rounds it (to nearest, ties to even; NaN stays NaN), spelled out in integer
    ops: the GPU's conversion does the same, but Triton's interpreter, which runs this kernel in CI, truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)


def add_rows_into(out: torch.Tensor, total: torch.Tensor, part: torch.Tensor, start: int) -> None:
    """out <- total + part on rows [start, start + part rows) (all (B, H, S, D), any strides), one launch.
    Rows of `total` outside the part are converted, not added to."""
    batch, heads, rows, dim = total.shape
    if out.numel() == 0:
        return
    block_d = triton.next_power_of_2(dim)
    block_s = max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(rows, block_s), batch * heads)
    _add_rows[grid](out, total, part, heads, rows, dim, start, part.shape[2],
                    *out.stride(), *total.stride(), *part.stride(), BLOCK_S=block_s, BLOCK_D=block_d,
                    OUT_BF16=out.dtype == torch.bfloat16)
