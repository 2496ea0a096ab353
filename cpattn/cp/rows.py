"""The query rows a ring step hands its kernel: views or copies of the rows that stay on this rank."""

from __future__ import annotations

import torch

from ..contract import AttentionCall, Provider


class StationaryRows:
    """Some query rows of the tensors that stay put (query; dO, out and lse in a backward), as the provider
    takes them: views where its kernels read strided rows as they are (`Capabilities.row_views`), else dense
    copies made once per distinct row range. Zigzag steps with a later source all use the same rows (my late
    chunk), so a copy serves every such step; a windowed ring (halo.py) cuts rows by its blocks' reach."""

    def __init__(self, full_rows: int, views: bool, **tensors: torch.Tensor):
        self._full, self._views, self._tensors, self._made = full_rows, views, tensors, {}

    def get(self, name: str, rows: slice) -> torch.Tensor:
        x = self._tensors[name]
        if rows.start == 0 and rows.stop == self._full:
            return x
        if self._views:
            return x[:, :, rows]
        key = (name, rows.start, rows.stop)
        if key not in self._made:
            self._made[key] = x[:, :, rows].contiguous()
        return self._made[key]


def stationary_rows(provider: Provider, call: AttentionCall, **tensors: torch.Tensor) -> StationaryRows:
    caps = provider.capabilities(call.device.type)
    return StationaryRows(call.q_len, caps is not None and caps.row_views, **tensors)
