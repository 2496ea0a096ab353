"""Sliding windows as bands of key offsets, and the blocks of a sharded sequence they touch.

A window (left, right) lets query position p see key position k iff p - left <= k <= p + right (None on a side:
unbounded). For a block of queries starting at global position qa against keys starting at ka, the same band in
the block's own top-left coordinates (query i at qa + i, key j at ka + j) is (left - d, right + d) with
d = qa - ka: off the diagonal a side can be negative, which no kernel takes. `trim_block` cuts such a block to
the rows and keys the band reaches; the band of what is left has both sides >= 0 (at most one of the two
starts moves, see its docstring), and sides that cover the whole trimmed block become None (no window there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Side = "int | None"


@dataclass(frozen=True)
class TrimmedBlock:
    """Rows [q0, q1) and keys [k0, k1) of a block that its band reaches; `window` is the band on them, top-left,
    each side >= 0 or None (unbounded within the block), or None when the band covers the whole trimmed block."""

    q0: int
    q1: int
    k0: int
    k1: int
    window: "tuple[int | None, int | None] | None"

    @property
    def whole(self) -> bool:
        return self.window is None


def window_band(window: "tuple[int | None, int | None] | None", is_causal: bool):
    """The (left, right) band of key offsets a window and a causal flag allow together (causal: right <= 0),
    None when neither limits anything."""
    if window is None:
        return (None, 0) if is_causal else None
    left, right = window
    if is_causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def shifted(window: "tuple[int | None, int | None]", q_start: int, k_start: int):
    """A global window in the top-left coordinates of a block whose queries start at q_start, keys at k_start."""
    left, right = window
    d = q_start - k_start
    return (None if left is None else left - d), (None if right is None else right + d)


def trim_block(q_len: int, k_len: int, window: "tuple[int | None, int | None] | None") -> TrimmedBlock | None:
    """The part of a (q_len x k_len) block that a top-left band (left, right) reaches; None if it reaches nothing.

    Row i reaches keys [i - left, i + right]. Keys reached by some row: [max(0, -left), min(k_len, q_len + right));
    rows that reach some key: [max(0, -right), min(q_len, k_len + left)). Cutting k0 keys and q0 rows moves the
    band to (left - q0 + k0, right + q0 - k0). A negative left (k0 > 0) and a negative right (q0 > 0) cannot
    both hold in a band that reaches anything, and the moved sides are then >= 0: left + right and 0, or 0 and
    left + right."""
    if q_len == 0 or k_len == 0:
        return None
    left, right = (None, None) if window is None else window
    if left is not None and right is not None and -left > right:
        return None  # j - i would have to lie in [-left, right], an empty range
    k0 = 0 if left is None else max(0, -left)
    k1 = k_len if right is None else min(k_len, q_len + right)
    q0 = 0 if right is None else max(0, -right)
    q1 = q_len if left is None else min(q_len, k_len + left)
    if k0 >= k1 or q0 >= q1:
        return None
    new_left = None if left is None else left - q0 + k0
    new_right = None if right is None else right + q0 - k0
    rows, keys = q1 - q0, k1 - k0
    if new_left is not None and new_left >= rows - 1:
        new_left = None
    if new_right is not None and new_right >= keys - 1:
        new_right = None
    band = None if new_left is None and new_right is None else (new_left, new_right)
    return TrimmedBlock(q0, q1, k0, k1, band)


def band_mask(q_positions: torch.Tensor, k_positions: torch.Tensor,
              window: "tuple[int | None, int | None]") -> torch.Tensor:
    """(len(q), len(k)) bool: query at position p sees key at position k iff p - left <= k <= p + right."""
    left, right = window
    offset = k_positions.view(1, -1) - q_positions.view(-1, 1)
    allowed = torch.ones(offset.shape, dtype=torch.bool, device=offset.device)
    if left is not None:
        allowed &= offset >= -left
    if right is not None:
        allowed &= offset <= right
    return allowed


def local_band_mask(q_len: int, k_len: int, window: "tuple[int | None, int | None]", device) -> torch.Tensor:
    """band_mask of a call's own top-left coordinates (query i at i, key j at j)."""
    return band_mask(torch.arange(q_len, device=device), torch.arange(k_len, device=device), window)
