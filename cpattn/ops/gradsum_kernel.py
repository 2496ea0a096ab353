"""`cpattn.ops.gradsum`'s sums as one Triton kernel: out = part_0 + part_1 + ... (up to `MAX_PARTS`), each
part on its own row range, summed in float32 in the order given and stored in out's dtype.

One program loads a tile of rows and, for each part, the rows of that part the tile meets (any strides: a
kernel's gradient may be a transposed view), adds them in registers and stores the tile once. Where `out` is the
first part (a fold in place), only the rows the other parts cover are read and written. A row starts from
its first covering part as it is (so a sum of one part keeps its bits, -0.0 included) and from 0.0 where the
first part does not cover it. Only `cpattn.ops.gradsum` calls this; it falls back to torch ops wherever Triton is
missing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gradsum import MAX_PARTS

# Launch shape of this kernel and cpattn/ops/merge_kernel.py: values per operand tile (rows = TILE_VALUES // head dim,
# at most 64) and warps per program.
TILE_VALUES = 4096
WARPS = 4


def tile_rows(dim: int, tile_values: int) -> int:
    return max(1, min(64, tile_values // triton.next_power_of_2(dim)))


@triton.jit
def _load_part(ptr, b, h, s, d, in_tile, start, n, p_b, p_h, p_s, p_d):
    """The tile's rows of one part (0.0 where it has none) and which rows it covers."""
    p = s - start
    covered = (p >= 0) & (p < n)
    y = tl.load(ptr + b * p_b + h * p_h + p[:, None] * p_s + d[None, :] * p_d, mask=in_tile & covered[:, None],
                other=0.0)
    return y.to(tl.float32), covered[:, None]


@triton.jit
def _add_parts(
    out, heads, rows, dim, o_b, o_h, o_s, o_d,
    x0, st0, n0, x0_b, x0_h, x0_s, x0_d,
    x1, st1, n1, x1_b, x1_h, x1_s, x1_d,
    x2, st2, n2, x2_b, x2_h, x2_s, x2_d,
    x3, st3, n3, x3_b, x3_h, x3_s, x3_d,
    PARTS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, OUT_BF16: tl.constexpr,
    IN_PLACE: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // heads, bh % heads
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    in_tile = (s < rows)[:, None] & (d < dim)[None, :]
    if IN_PLACE:  # out is the first part: rows no other part covers stay as they are, unread and unwritten
        in_tile = in_tile & _covered(s, st1, n1, st2, n2, st3, n3, PARTS)[:, None]
    y, covered = _load_part(x0, b, h, s, d, in_tile, st0, n0, x0_b, x0_h, x0_s, x0_d)
    x = tl.where(covered, y, 0.0)  # the first part as it is, not 0.0 + part (keeps -0.0)
    if PARTS > 1:
        y, covered = _load_part(x1, b, h, s, d, in_tile, st1, n1, x1_b, x1_h, x1_s, x1_d)
        x = tl.where(covered, x + y, x)
    if PARTS > 2:
        y, covered = _load_part(x2, b, h, s, d, in_tile, st2, n2, x2_b, x2_h, x2_s, x2_d)
        x = tl.where(covered, x + y, x)
    if PARTS > 3:
        y, covered = _load_part(x3, b, h, s, d, in_tile, st3, n3, x3_b, x3_h, x3_s, x3_d)
        x = tl.where(covered, x + y, x)
    if OUT_BF16:
        x = _bf16_round_nearest_even(x)
    tl.store(out + b * o_b + h * o_h + s[:, None] * o_s + d[None, :] * o_d, x.to(out.dtype.element_ty),
             mask=in_tile)


@triton.jit
def _covered(s, st1, n1, st2, n2, st3, n3, PARTS: tl.constexpr):
    """Which rows `s` the parts after the first cover."""
    hit = (s >= st1) & (s < st1 + n1)
    if PARTS > 2:
        hit = hit | ((s >= st2) & (s < st2 + n2))
    if PARTS > 3:
        hit = hit | ((s >= st3) & (s < st3 + n3))
    return hit


@triton.jit
def _bf16_round_nearest_even(x):
    """float32 -> bfloat16 as torch rounds it (to nearest, ties to even; NaN stays NaN), spelled out in integer
    ops: the GPU's conversion does the same, but Triton's interpreter, which runs this kernel in CI, truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where(x != x, x.to(tl.bfloat16), rounded)


def add_parts_into(out: torch.Tensor, parts: list[tuple[torch.Tensor, int]], tile_values: int = TILE_VALUES,
                   warps: int = WARPS) -> None:
    """out <- the sum of `parts`, each (tensor, first row) covering rows [first row, first row + its rows) of out;
    all (B, H, S, D), any strides; one launch for up to MAX_PARTS parts. `out` may be the first part itself, or a
    view of it (each element is read before it is written, by one program)."""
    assert 1 <= len(parts) <= MAX_PARTS, f"1 to {MAX_PARTS} parts per launch, got {len(parts)}"
    batch, heads, rows, dim = out.shape
    if out.numel() == 0:
        return
    slots = list(parts) + [parts[0]] * (MAX_PARTS - len(parts))  # unused slots: compiled out (PARTS)
    args = []
    for x, first in slots:
        args += [x, first, x.shape[2], *x.stride()]
    block_s = tile_rows(dim, tile_values)
    grid = (triton.cdiv(rows, block_s), batch * heads)
    _add_parts[grid](out, heads, rows, dim, *out.stride(), *args, PARTS=len(parts), BLOCK_S=block_s,
                     BLOCK_D=triton.next_power_of_2(dim), OUT_BF16=out.dtype == torch.bfloat16,
                     IN_PLACE=len(parts) > 1 and _is_out(parts[0], out), num_warps=warps)


def _is_out(part: tuple[torch.Tensor, int], out: torch.Tensor) -> bool:
    """Whether the first part is `out` itself, every row (an in-place fold)."""
    x, first = part
    return (first == 0 and x.data_ptr() == out.data_ptr() and x.shape == out.shape
            and x.stride() == out.stride() and x.dtype == out.dtype)
