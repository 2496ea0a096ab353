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

A sum whose parts all stay on this rank (dQ: the queries never move) need not be added step by step at all:
`RowSum` keeps the parts as they come and adds them in one pass when the sum is asked for, `MAX_PARTS` at a
time. For W parts of a zigzag dQ that reads each part once and writes the result once, where the adds above read
and write a float32 sum W-1 times (at W=4 about 10 passes of the output's size against 4). The float32 additions
are the same, in the same order: the same bits.

On CUDA each of those is one Triton kernel (cpattn/gradsum_kernel.py); elsewhere the same arithmetic in torch
ops. Every float32 addition happens in the same order either way, so both give the same bits.
"""

from __future__ import annotations

import torch

from .triton_kernels import optional_kernel

MAX_PARTS = 4  # parts one Triton launch adds (cpattn/gradsum_kernel.py); RowSum folds longer sums in float32


def _fused_add():
    """The one-launch Triton sum of parts (cpattn/gradsum_kernel.py: `add_parts_into(out, [(part, first row),
    ...])`), or None where Triton cannot be imported."""
    return optional_kernel("gradsum_kernel", "add_parts_into")


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
            fused(view, [(view, 0), (part, 0)])
        else:
            view.add_(part)
        return total
    if fused is not None:
        out = torch.empty(total.shape, dtype=out_dtype, device=total.device)
        fused(out, [(total, 0), (part, rows.start)])
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


class RowSum:
    """A sum of row parts that is needed only once all are known (a rank's dQ over the ring's steps): the parts
    are kept as they come and added when `result` asks for the sum, up to MAX_PARTS in one pass (see the module
    docstring). Holding W parts costs about what a float32 sum and one part cost, up to W=4; a part arriving
    when MAX_PARTS are held first folds them into a float32 sum, so at most MAX_PARTS tensors are held."""

    def __init__(self, shape: tuple, device) -> None:
        self._shape, self._device = tuple(shape), device
        self._parts: list[tuple[torch.Tensor, int]] = []  # (part, first row), in the order added

    def add(self, rows: slice, part: torch.Tensor) -> None:
        """Add `part` on `rows` (kept, not copied: the caller must not write to it afterwards)."""
        if len(self._parts) == MAX_PARTS:  # fold a full hand when one more comes: the last fold writes the result
            self._fold(torch.float32)
        self._parts.append((part, rows.start))

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        """The sum in `dtype`, contiguous, rounded once; zeros if no part was added."""
        if not self._parts:
            return torch.zeros(self._shape, dtype=dtype, device=self._device)
        part, first = self._parts[0]
        if len(self._parts) > 1 or first != 0 or part.shape[2] != self._shape[2]:
            self._fold(dtype)
        return finish(self._parts[0][0], dtype)

    def _fold(self, dtype: torch.dtype) -> None:
        out = torch.empty(self._shape, dtype=dtype, device=self._device)
        first_part = self._parts[0][0]
        fused = _fused_add() if _fuse_on(first_part) else None
        if fused is not None:
            fused(out, self._parts)
        else:  # the kernel's arithmetic: rows start from their first part as it is, or 0.0; float32 adds in order
            total = torch.zeros(self._shape, dtype=torch.float32, device=self._device)
            for i, (part, first) in enumerate(self._parts):
                rows = total.narrow(2, first, part.shape[2])
                if i == 0:
                    rows.copy_(part)
                else:
                    rows.add_(part)
            out.copy_(total)
        self._parts = [(out, 0)]
