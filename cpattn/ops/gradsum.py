"""Sums of gradient parts along the sequence (the ring backward's dQ, dK and dV), in float32, rounded once.

A ring backward gets each of dQ, dK and dV in parts, one per step, in the inputs' dtype (bf16, say); each part
covers some rows of the whole (zigzag blocks cover half). Their sum must be taken in float32 and rounded once.
All parts of a sum are known before it is needed (dQ's stay on their rank; dK/dV parts are sent to their
block's owner), so `DeferredRowSum` keeps the parts as they come and adds them in one pass when the sum is asked for,
`MAX_PARTS` at a time: it reads each part once and writes the result once, in the final dtype (longer sums keep
a float32 sum, into which later parts are added in place on the rows they cover). Added step by
step into a float32 accumulator, the same sum reads and writes that accumulator once per part (at W=4 zigzag
parts about 10 passes of the output's size against 4).

On CUDA each pass is one Triton kernel (cpattn/ops/gradsum_kernel.py); elsewhere the same arithmetic in torch ops:
a row starts from its first part as it is, then float32 adds in the order the parts came. Both give the same
bits.
"""

from __future__ import annotations

import torch

from .triton_kernels import optional_kernel

MAX_PARTS = 4  # parts one Triton launch adds (cpattn/ops/gradsum_kernel.py); DeferredRowSum folds longer sums in float32


def _fused_add():
    """The one-launch Triton sum of parts (cpattn/ops/gradsum_kernel.py: `add_parts_into(out, [(part, first row),
    ...])`), or None where Triton cannot be imported."""
    return optional_kernel("gradsum_kernel", "add_parts_into")


def _fuse_on(part: torch.Tensor) -> bool:
    """Where the Triton add runs: CUDA tensors (tests/support/gradsum_kernel_check.py widens it to CPU tensors under
    Triton's interpreter)."""
    return part.is_cuda


def finish(total: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """`total` in `out_dtype`, contiguous; `total` itself where it is both already."""
    if total.dtype == out_dtype:
        return total.contiguous()
    out = torch.empty(total.shape, dtype=out_dtype, device=total.device)  # one pass, whatever total's strides
    out.copy_(total)
    return out


class DeferredRowSum:
    """A sum of row parts that is needed only once all are known (a rank's dQ, dK or dV over the ring's steps):
    the parts are kept as they come and added when `result` asks for the sum, up to MAX_PARTS in one pass (see
    the module docstring). Holding W parts costs about what a float32 sum and one part cost, up to W=4; a part arriving
    when MAX_PARTS are held first folds them into a float32 sum, so at most MAX_PARTS tensors are held."""

    def __init__(self, shape: tuple, device, one_stream: bool = False, writable_parts: bool = False) -> None:
        """`one_stream`: the caller makes every part, and asks for the result, on the stream current here (the
        packed ring runs on one stream), so no part needs the stream bookkeeping below, which costs host time on
        every part. `writable_parts`: the parts are the caller's to overwrite (new kernel outputs it never reads
        again); then a part that covers every row in the result's dtype becomes the result, the other parts
        added into it on the rows they cover (`_add_into_part`), instead of a pass over every row."""
        self._shape, self._device = tuple(shape), torch.device(device)
        self._writable = writable_parts
        self._parts: list[tuple[torch.Tensor, int]] = []  # (part, first row), in the order added
        self._sum: torch.Tensor | None = None  # the float32 sum of the parts folded so far, once there is one
        # Parts may be made on other CUDA streams than this sum's home stream (a ring backward's steps take
        # streams in turn, cpattn/cp/streams.py): per part, (stream, event recorded when it was added), or None
        # for parts added on the home stream. Whichever stream adds the parts up waits for those first.
        tracked = self._device.type == "cuda" and not one_stream
        self._home = torch.cuda.current_stream(self._device) if tracked else None
        self._made: list[tuple | None] = []

    @property
    def empty(self) -> bool:
        """Whether no part was added."""
        return not self._parts

    def add(self, rows: slice, part: torch.Tensor) -> None:
        """Add `part` on `rows` (kept, not copied: the caller must not write to it afterwards)."""
        if len(self._parts) == MAX_PARTS:  # fold a full hand when one more comes: the last fold writes the result
            self._fold(torch.float32)
        self._parts.append((part, rows.start))
        self._made.append(self._made_here())

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        """The sum in `dtype`, contiguous, rounded once; zeros if no part was added."""
        if not self._parts:
            return torch.zeros(self._shape, dtype=dtype, device=self._device)
        part, first = self._parts[0]
        whole = self._whole_part(dtype) if len(self._parts) > 1 else None
        if whole is not None:
            self._add_into_part(whole)
        elif len(self._parts) > 1 or first != 0 or part.shape[2] != self._shape[2]:
            self._fold(dtype)
        else:
            self._read_here()
        return finish(self._parts[0][0], dtype)

    def _whole_part(self, dtype: torch.dtype) -> int | None:
        """The index of a part the sum may be made in (writable, every row, the result's dtype, no float32 sum
        yet), else None."""
        if not self._writable or self._sum is not None:
            return None
        for i, (part, first) in enumerate(self._parts):
            if first == 0 and tuple(part.shape) == self._shape and part.dtype == dtype:
                return i
        return None

    def _add_into_part(self, index: int) -> None:
        """The sum made in part `index`: the other parts, in the order they came, added to it in float32 on the
        rows they cover and rounded once; its other rows keep their bits. The same float32 adds as a fold that
        starts from that part, reading and writing only the rows the others cover."""
        self._read_here()
        base = self._parts[index][0]
        self._add_into(base, self._parts[:index] + self._parts[index + 1:], _fused_add() if _fuse_on(base) else None)

    def _made_here(self) -> tuple | None:
        """(stream, event) where the current stream is not the home stream, else None."""
        if self._home is None:
            return None
        stream = torch.cuda.current_stream(self._device)
        return None if stream == self._home else (stream, stream.record_event())

    def _read_here(self) -> None:
        """Order the current stream after every part made on another stream, and keep each such part's memory
        from being reused before this stream has read it."""
        if self._home is None:
            return
        current = torch.cuda.current_stream(self._device)
        for (part, _), made in zip(self._parts, self._made):
            stream, event = made or (self._home, None)
            if stream == current:
                continue
            if event is None:
                current.wait_stream(self._home)
            else:
                current.wait_event(event)
            part.record_stream(current)

    def _fold(self, dtype: torch.dtype) -> None:
        self._read_here()
        first_part = self._parts[0][0]
        fused = _fused_add() if _fuse_on(first_part) else None
        if dtype == torch.float32 and first_part is self._sum:  # a later fold: in place, on the new parts' rows
            self._fold_in_place(fused)
            return
        out = torch.empty(self._shape, dtype=dtype, device=self._device)
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
        self._sum = out if dtype == torch.float32 else None
        self._parts, self._made = [(out, 0)], [self._made_here()]

    def _fold_in_place(self, fused) -> None:
        """Add the parts after the float32 sum into it on the rows they cover (the same float32 adds, in the
        same order, as a fold into a new tensor): parts that cover a few rows each cost those rows, not the
        whole sum's."""
        self._add_into(self._sum, self._parts[1:], fused)

    def _add_into(self, base: torch.Tensor, others: list[tuple[torch.Tensor, int]], fused) -> None:
        """`others` added to `base` in float32, in order, on the rows they cover (a float32 base in place;
        another dtype rounded once); `base`, with every row, becomes the one part held."""
        lo = min(first for _, first in others)
        hi = max(first + part.shape[2] for part, first in others)
        rows = base.narrow(2, lo, hi - lo)
        if fused is not None:
            fused(rows, [(rows, 0)] + [(part, first - lo) for part, first in others])
        else:
            total = rows.float()  # `rows` itself where base is float32
            for part, first in others:
                total.narrow(2, first - lo, part.shape[2]).add_(part)
            if total is not rows:
                rows.copy_(total)
        self._parts, self._made = [(base, 0)], [self._made_here()]
