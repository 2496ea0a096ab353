"""Sums of gradient parts along the sequence (the ring backward's dQ, dK and dV), in float32, with as few passes
over memory as the sum allows.

A ring backward gets each of dQ, dK and dV in parts, one per step, in the inputs' dtype (bf16, say); each part
covers some rows of the whole (zigzag blocks cover half). Their sum must be taken in float32 and rounded once.
Spelled out in torch ops, a float32 accumulator costs, per element: a copy of the first part (2 + 4 bytes), one
add per further part (2 + 4 + 4) and a final cast (4 + 2). Two things make it cheaper, and neither changes a bit:

* The first part is the sum so far, exactly, in its own dtype: it is kept as it is (`start`), and the next add
  reads it in that dtype and writes the float32 sum (`add`: 2 + 2 + 4 bytes instead of 6 and 10).
* The last add writes the sum in the final dtype (`add(..., out_dtype=torch.bfloat16)`: 4 + 2 + 2 bytes instead
  of 10 and 6).
The adds between (float32 in place, 4 + 2 + 4 bytes) are the same kernel too: torch adds a bf16 part in a
kernel's transposed layout to a float32 sum with its generic strided loop, slower than the Triton tile.

On CUDA each of those is one Triton kernel (cpattn/gradsum_kernel.py); elsewhere the same arithmetic in torch
ops. Every float32 addition happens in the same order either way, so both give the same bits.
"""

from __future__ import annotations

import torch

from .triton_kernels import optional_kernel


def _fused_add():
    """The one-launch Triton add (cpattn/gradsum_kernel.py), or None where Triton cannot be imported."""
    return optional_kernel("gradsum_kernel", "add_rows_into")


def _fuse_on(part: torch.Tensor) -> bool:
    """Where the Triton add runs: CUDA tensors (tests/gradsum_kernel_check.py widens it to CPU tensors under
    Triton's interpreter)."""
    return part.is_cuda


def start(part: torch.Tensor, rows: slice, length: int) -> torch.Tensor:
    """The sum after its first part: `part` itself where it covers all `length` rows (exact, no copy; the caller
    owns it), else float32 zeros with `part` added on `rows`."""
    if rows.start == 0 and rows.stop == length:
        return part
    total = part.new_zeros(part.shape[:2] + (length,) + part.shape[3:], dtype=torch.float32)
    total.narrow(2, rows.start, rows.stop - rows.start).add_(part)
    return total


def add(total: torch.Tensor, rows: slice, part: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`total` with `part` added on `rows`, summed in float32 and returned in `out_dtype`.

    A float32 `total` that stays float32 is added to in place (it is the caller's accumulator); otherwise the
    result is a new contiguous tensor and `total` is left as it was."""
    fused = _fused_add() if _fuse_on(part) else None
    if total.dtype == torch.float32 and out_dtype == torch.float32:
        view = total.narrow(2, rows.start, rows.stop - rows.start)
        if fused is not None:  # torch's mixed-dtype add of a transposed part takes its slow strided kernel
            fused(view, view, part, 0)
        else:
            view.add_(part)
        return total
    if fused is not None:
        out = torch.empty(total.shape, dtype=out_dtype, device=total.device)
        fused(out, total, part, rows.start)
        return out
    out = total.to(torch.float32, copy=True)
    out.narrow(2, rows.start, rows.stop - rows.start).add_(part)
    return out.to(out_dtype)


def finish(total: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The sum in `out_dtype`, contiguous (what a transfer needs); `total` itself where it is both already."""
    if total.dtype == out_dtype:
        return total.contiguous()
    out = torch.empty(total.shape, dtype=out_dtype, device=total.device)  # one pass, whatever total's strides
    out.copy_(total)
    return out
