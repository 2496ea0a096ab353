"""Context parallelism: ring, Ulysses, hybrid and all-gather schedules (registry.py) over any provider, with
windows, softcaps and sinks under each, and cross-attention to key/value whole on every rank (cross.py).

Public helpers here shard and reassemble sequences in the layout the schedules assume.
"""

from __future__ import annotations

import torch

from .comm import all_gather_padded, gather_signatures
from .context import ContextParallel
from .layout import LAYOUTS, local_positions, shard_positions
from .mesh import topology_from_mesh
from .registry import STRATEGIES

__all__ = [
    "ContextParallel", "LAYOUTS", "STRATEGIES", "document_mask", "gather_sequence", "local_position_ids",
    "shard_sequence",
]


def local_position_ids(total_len: int, cp_mesh, layout: str = "zigzag", device=None) -> torch.Tensor:
    """Global positions (e.g. for RoPE) of the tokens this rank holds, in local order."""
    t = topology_from_mesh(cp_mesh)
    return local_positions(total_len, t.ring_size, t.ulysses_size, t.ring_rank, t.ulysses_rank, layout, device)


def shard_sequence(x: torch.Tensor, cp_mesh, seq_dim: int, layout: str = "zigzag") -> torch.Tensor:
    """This rank's shard of a full tensor along `seq_dim`, in the layout the schedules assume.

    Any length works: shards differ by at most one token per chunk when it does not divide evenly.
    """
    positions = local_position_ids(x.shape[seq_dim], cp_mesh, layout, x.device)
    return x.index_select(seq_dim, positions)


@torch.no_grad()
def gather_sequence(x_local: torch.Tensor, cp_mesh, seq_dim: int, layout: str = "zigzag",
                    timeout: float = 60.0) -> torch.Tensor:
    """Inverse of `shard_sequence`: the full tensor on every rank (not differentiable)."""
    t = topology_from_mesh(cp_mesh)
    seq_dim = seq_dim % x_local.dim()
    groups = [g for g in (t.ulysses, t.ring) if g is not None]
    gathered = x_local
    for group in groups:  # Ulysses parts first (they concatenate to a ring shard), then ring shards
        lengths = gather_signatures([gathered.shape[seq_dim]], group, timeout, x_local.device)[:, 0].tolist()
        parts = all_gather_padded(gathered, lengths, seq_dim, group, timeout)
        gathered = torch.cat(parts, dim=seq_dim)
    total = gathered.shape[seq_dim]
    positions = torch.cat(shard_positions(total, t.ring_size, t.ulysses_size, layout)).to(x_local.device)
    out = torch.empty_like(gathered)
    out.index_copy_(seq_dim, positions, gathered)
    return out


def document_mask(cu_seqlens: torch.Tensor, cp_mesh=None, layout: str = "zigzag", causal: bool = False,
                  device=None) -> torch.Tensor:
    """Boolean mask for packed documents: a token attends only to tokens of its own document.

    `cu_seqlens` are the global document boundaries of the packed sequence (int, starting at 0, ending at the
    total length; documents may cross shard boundaries). Without `cp_mesh` the mask is (S, S); with it, it is
    this rank's rows x all keys in global order, (S_local, S): exactly what attn_mask takes under context
    parallelism. `causal=True` also hides later tokens (then pass is_causal=False).
    """
    cu = torch.as_tensor(cu_seqlens, device=device).long()
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and never decrease; got {cu.tolist()}")
    total = int(cu[-1])
    keys = torch.arange(total, device=cu.device)
    doc = torch.bucketize(keys, cu[1:], right=True)  # document index of every global position
    rows = keys if cp_mesh is None else local_position_ids(total, cp_mesh, layout, cu.device)
    mask = doc[rows].unsqueeze(1) == doc.unsqueeze(0)
    if causal:
        mask &= keys.unsqueeze(0) <= rows.unsqueeze(1)
    return mask
