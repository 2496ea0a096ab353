"""The ring's merges as one Triton kernel: up to `MAX_BLOCKS` partial results (out, lse), each on its own rows,
merged into one (out, lse) in a single pass.

`cpattn.ops.merge.merge_two` spells a merge out in torch ops: about fifteen elementwise kernels per block, three of
them passes over the (B, H, S, Dv) output, plus a copy back when the block covered only some rows (zigzag).
Here one program loads a tile of rows of every block that covers them, merges them in registers with the same
guarded arithmetic as `merge_two` (for two blocks, the same operations in the same order), and stores the tile
once, in the destination's dtype. A row covered by one block keeps that block's values (converted); a row no
block covers gets out 0, lse -inf. The destination may be new storage (how a kept bf16 block becomes float32 and
how the last merge writes the result dtype) or the first block itself (in place: the caller then passes views of
the rows to write). Only `cpattn.ops.merge` calls this; it falls back to torch ops wherever Triton is missing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gradsum_kernel import TILE_VALUES, WARPS, _bf16_round_nearest_even, tile_rows
from .merge import _TINY, MAX_BLOCKS


@triton.jit
def _load_lse(lse, b, h, s, in_rows, start, n, l_b, l_h, l_s):
    """One block's lse on the tile's rows (-inf where it has none) and which rows it covers."""
    p = s - start
    covered = in_rows & (p >= 0) & (p < n)
    x = tl.load(lse + b * l_b + h * l_h + p * l_s, mask=covered, other=float("-inf")).to(tl.float32)
    return x, covered


@triton.jit
def _weighted(acc, out, b, h, s, d, in_tile, covered, start, w, o_b, o_h, o_s, o_d, FIRST: tl.constexpr):
    """acc + w * (one block's out on the tile's rows), on the rows the block covers; acc elsewhere."""
    p = s - start
    o = tl.load(out + b * o_b + h * o_h + p[:, None] * o_s + d[None, :] * o_d, mask=in_tile & covered[:, None],
                other=0.0).to(tl.float32)
    if FIRST:
        return tl.where(covered[:, None], o * w[:, None], acc)
    return tl.where(covered[:, None], acc + o * w[:, None], acc)  # not acc + 0: keeps a lone block's -0.0


@triton.jit
def _merge_blocks(
    out, out_lse, heads, rows, dim,
    o_b, o_h, o_s, o_d, ol_b, ol_h, ol_s,
    x0, l0, st0, n0, x0_b, x0_h, x0_s, x0_d, l0_b, l0_h, l0_s,
    x1, l1, st1, n1, x1_b, x1_h, x1_s, x1_d, l1_b, l1_h, l1_s,
    x2, l2, st2, n2, x2_b, x2_h, x2_s, x2_d, l2_b, l2_h, l2_s,
    x3, l3, st3, n3, x3_b, x3_h, x3_s, x3_d, l3_b, l3_h, l3_s,
    BLOCKS: tl.constexpr, TINY: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    OUT_BF16: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // heads, bh % heads
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    in_rows = s < rows
    in_tile = in_rows[:, None] & (d < dim)[None, :]

    # The guards of merge_two: shift by the row maximum, by 0 where every lse is -inf (an empty row), so empty
    # rows get weights 0, output 0 and lse -inf. A NaN lse reaches every weight and stays NaN.
    a, c0 = _load_lse(l0, b, h, s, in_rows, st0, n0, l0_b, l0_h, l0_s)
    m = a
    if BLOCKS > 1:
        b1, c1 = _load_lse(l1, b, h, s, in_rows, st1, n1, l1_b, l1_h, l1_s)
        m = tl.where(m > b1, m, b1)
    if BLOCKS > 2:
        b2, c2 = _load_lse(l2, b, h, s, in_rows, st2, n2, l2_b, l2_h, l2_s)
        m = tl.where(m > b2, m, b2)
    if BLOCKS > 3:
        b3, c3 = _load_lse(l3, b, h, s, in_rows, st3, n3, l3_b, l3_h, l3_s)
        m = tl.where(m > b3, m, b3)
    m = tl.where(m == float("-inf"), 0.0, m)
    w0 = tl.exp(a - m)
    z = w0
    if BLOCKS > 1:
        w1 = tl.exp(b1 - m)
        z = z + w1
    if BLOCKS > 2:
        w2 = tl.exp(b2 - m)
        z = z + w2
    if BLOCKS > 3:
        w3 = tl.exp(b3 - m)
        z = z + w3
    lse = tl.where(z == 0.0, float("-inf"), m + tl.log(z))
    inv_z = 1.0 / tl.maximum(z, TINY)

    result = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    result = _weighted(result, x0, b, h, s, d, in_tile, c0, st0, w0 * inv_z, x0_b, x0_h, x0_s, x0_d, True)
    if BLOCKS > 1:
        result = _weighted(result, x1, b, h, s, d, in_tile, c1, st1, w1 * inv_z, x1_b, x1_h, x1_s, x1_d, False)
    if BLOCKS > 2:
        result = _weighted(result, x2, b, h, s, d, in_tile, c2, st2, w2 * inv_z, x2_b, x2_h, x2_s, x2_d, False)
    if BLOCKS > 3:
        result = _weighted(result, x3, b, h, s, d, in_tile, c3, st3, w3 * inv_z, x3_b, x3_h, x3_s, x3_d, False)
    if OUT_BF16:
        result = _bf16_round_nearest_even(result)
    tl.store(out + b * o_b + h * o_h + s[:, None] * o_s + d[None, :] * o_d, result.to(out.dtype.element_ty),
             mask=in_tile)
    tl.store(out_lse + b * ol_b + h * ol_h + s * ol_s, lse, mask=in_rows)


def merge_blocks_into(out: torch.Tensor, out_lse: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor, int]],
                      tile_values: int = TILE_VALUES, warps: int = WARPS) -> None:
    """(out, out_lse) <- the merge of `blocks`, each (out_b, lse_b, first row) covering rows [first row, first row
    + its rows); one launch for up to MAX_BLOCKS blocks.

    All (B, H, S, Dv) and (B, H, S), any strides; blocks in any float dtype, `out` float32 or the result dtype,
    the lse float32. `out` may be the first block itself (each element is read before it is written, by one
    program)."""
    assert 1 <= len(blocks) <= MAX_BLOCKS, f"1 to {MAX_BLOCKS} blocks per launch, got {len(blocks)}"
    batch, heads, rows, dim = out.shape
    if rows == 0 or batch * heads == 0:
        return
    slots = list(blocks) + [blocks[0]] * (MAX_BLOCKS - len(blocks))  # unused slots: compiled out (BLOCKS)
    args = []
    for x, lse, first in slots:
        args += [x, lse, first, x.shape[2], *x.stride(), *lse.stride()]
    block_s = tile_rows(dim, tile_values)
    grid = (triton.cdiv(rows, block_s), batch * heads)
    _merge_blocks[grid](
        out, out_lse, heads, rows, dim, *out.stride(), *out_lse.stride(), *args,
        BLOCKS=len(blocks), TINY=_TINY, BLOCK_S=block_s, BLOCK_D=triton.next_power_of_2(dim),
        OUT_BF16=out.dtype == torch.bfloat16, num_warps=warps,
    )



# -- decode's combine: N partials of the same rows, packed (out | lse) as the all-gather carries them ------------

@triton.jit
def _pack_rows(out, lse, packed, rows, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """packed[r, :dim] = float32(out[r]), packed[r, dim] = lse[r], rows flattened (contiguous inputs)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    in_rows = r < rows
    tile = in_rows[:, None] & (d < dim)[None, :]
    o = tl.load(out + r[:, None] * dim + d[None, :], mask=tile, other=0.0).to(tl.float32)
    tl.store(packed + r[:, None] * (dim + 1) + d[None, :], o, mask=tile)
    x = tl.load(lse + r, mask=in_rows, other=float("-inf")).to(tl.float32)
    tl.store(packed + r * (dim + 1) + dim, x, mask=in_rows)


@triton.jit
def _merge_packed(packed, out, out_lse, parts, rows, dim, TINY: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr, OUT_BF16: tl.constexpr):
    """out[r], out_lse[r] <- the merge of packed[i, r] over the `parts` partials, the guards of merge_stacked: the
    exponents shifted by the row maximum (0 where every lse is -inf), so an empty row gets out 0 and lse -inf."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    in_rows = r < rows
    tile = in_rows[:, None] & (d < dim)[None, :]
    stride = rows * (dim + 1)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    for i in range(parts):
        x = tl.load(packed + i * stride + r * (dim + 1) + dim, mask=in_rows, other=float("-inf"))
        m = tl.where(m > x, m, x)
    m = tl.where(m == float("-inf"), 0.0, m)
    z = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for i in range(parts):
        x = tl.load(packed + i * stride + r * (dim + 1) + dim, mask=in_rows, other=float("-inf"))
        w = tl.exp(x - m)
        z = z + w
        o = tl.load(packed + i * stride + r[:, None] * (dim + 1) + d[None, :], mask=tile, other=0.0)
        acc = acc + o * w[:, None]
    lse = tl.where(z == 0.0, float("-inf"), m + tl.log(z))
    result = acc * (1.0 / tl.maximum(z, TINY))[:, None]
    if OUT_BF16:
        result = _bf16_round_nearest_even(result)
    tl.store(out + r[:, None] * dim + d[None, :], result.to(out.dtype.element_ty), mask=tile)
    tl.store(out_lse + r, lse, mask=in_rows)


SPREAD_PROGRAMS = 128  # about the SMs of one GPU: decode's few rows are spread over this many programs


def _row_tile(dim: int, rows: int) -> tuple[int, int]:
    """(rows per program, padded head dim): at most TILE_VALUES values per operand tile, and few enough rows that
    a decode step's rows (B * H * new tokens, a few hundred) still fill the GPU: each program's work is a few
    loads, so latency, not bandwidth, is what more programs cut."""
    block_d = triton.next_power_of_2(dim)
    spread = triton.next_power_of_2(triton.cdiv(rows, SPREAD_PROGRAMS))
    return max(1, min(64, TILE_VALUES // block_d, spread)), block_d


def pack_partial(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """(B, H, S, Dv) out and (B, H, S) lse -> one contiguous float32 (B, H, S, Dv + 1) buffer, in one launch."""
    out, lse = out.contiguous(), lse.contiguous()
    dim, rows = out.shape[-1], lse.numel()
    packed = torch.empty((*out.shape[:-1], dim + 1), dtype=torch.float32, device=out.device)
    if rows:
        block_r, block_d = _row_tile(dim, rows)
        _pack_rows[(triton.cdiv(rows, block_r),)](out, lse, packed, rows, dim, BLOCK_R=block_r, BLOCK_D=block_d,
                                                  num_warps=WARPS)
    return packed


def merge_packed(gathered: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(out in `dtype`, lse float32) of N stacked packed partials `gathered` (N, B, H, S, Dv + 1) float32
    contiguous, in one launch."""
    parts, *lead, width = gathered.shape
    dim = width - 1
    out = torch.empty((*lead, dim), dtype=dtype, device=gathered.device)
    lse = torch.empty(lead, dtype=torch.float32, device=gathered.device)
    rows = lse.numel()
    if rows:
        block_r, block_d = _row_tile(dim, rows)
        _merge_packed[(triton.cdiv(rows, block_r),)](gathered, out, lse, parts, rows, dim, TINY=_TINY,
                                                     BLOCK_R=block_r, BLOCK_D=block_d,
                                                     OUT_BF16=dtype == torch.bfloat16, num_warps=WARPS)
    return out, lse
