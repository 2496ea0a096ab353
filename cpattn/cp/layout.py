"""Which global sequence positions each rank holds: the one place that defines sharding.

Two layouts over the ring dimension of R ranks:

* ``contiguous``: the sequence in R consecutive chunks, rank r holds chunk r.
* ``zigzag`` (head-tail): the sequence in 2R chunks c_0..c_{2R-1}; ring rank r holds [c_r, c_{2R-1-r}].
  Under causal attention every rank then does the same work (one diagonal block and R-1 half blocks),
  where contiguous leaves the last rank R times the work of the first.

On a 2-D mesh ("ring", "ulysses") of R x U ranks, ring rank r's positions are further split into U
consecutive parts, one per Ulysses rank, so that the Ulysses all-to-all (which concatenates the parts in
Ulysses-rank order) rebuilds ring rank r's positions exactly. A 1-D mesh of W ranks is R = W, U = 1.

Chunks are as even as the length allows (sizes differ by at most one), so any length works, including
lengths not divisible by 2R and lengths shorter than the number of chunks (some chunks are empty).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

LAYOUTS = ("zigzag", "contiguous")


def even_sizes(total: int, parts: int) -> list[int]:
    """Split `total` into `parts` sizes differing by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class Chunk:
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@functools.lru_cache(maxsize=1024)
def ring_chunks(total: int, ring_size: int, ring_rank: int, layout: str) -> tuple[Chunk, ...]:
    """The chunks (in local order) that ring rank `ring_rank` holds of a sequence of `total` tokens."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    n = 2 * ring_size if layout == "zigzag" else ring_size
    sizes = even_sizes(total, n)
    starts = [sum(sizes[:i]) for i in range(n)]
    chunk = lambda i: Chunk(starts[i], starts[i] + sizes[i])  # noqa: E731
    if layout == "zigzag":
        return (chunk(ring_rank), chunk(n - 1 - ring_rank))
    return (chunk(ring_rank),)


@functools.lru_cache(maxsize=1024)
def ring_shard_len(total: int, ring_size: int, ring_rank: int, layout: str) -> int:
    return sum(c.size for c in ring_chunks(total, ring_size, ring_rank, layout))


@functools.lru_cache(maxsize=1024)
def local_len(total: int, ring_size: int, ulysses_size: int, ring_rank: int, ulysses_rank: int, layout: str) -> int:
    return even_sizes(ring_shard_len(total, ring_size, ring_rank, layout), ulysses_size)[ulysses_rank]


def ring_positions(total: int, ring_size: int, ring_rank: int, layout: str, device=None) -> torch.Tensor:
    """Global positions of ring rank `ring_rank`'s tokens, in local order."""
    chunks = ring_chunks(total, ring_size, ring_rank, layout)
    return torch.cat([torch.arange(c.start, c.stop, device=device) for c in chunks])


def local_positions(
    total: int, ring_size: int, ulysses_size: int, ring_rank: int, ulysses_rank: int, layout: str, device=None
) -> torch.Tensor:
    """Global positions of the tokens one rank of an R x U mesh holds, in local order."""
    pos = ring_positions(total, ring_size, ring_rank, layout, device)
    sizes = even_sizes(pos.numel(), ulysses_size)
    start = sum(sizes[:ulysses_rank])
    return pos[start : start + sizes[ulysses_rank]]


def shard_positions(total: int, ring_size: int, ulysses_size: int, layout: str) -> list[torch.Tensor]:
    """Positions of every rank, in the order (ring rank major, Ulysses rank minor)."""
    return [
        local_positions(total, ring_size, ulysses_size, r, u, layout)
        for r in range(ring_size)
        for u in range(ulysses_size)
    ]


def gathered_order(total: int, ring_size: int, layout: str, device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """For 1-D schedules that gather every rank's tokens in rank order: (the permutation that puts the
    concatenation in global order, or None where it already is; the concatenation's global positions)."""
    positions = _gathered_positions(total, ring_size, layout, device)
    if bool((positions[1:] >= positions[:-1]).all()):
        return None, positions
    return torch.argsort(positions), positions


@functools.lru_cache(maxsize=256)
def _gathered_positions(total: int, ring_size: int, layout: str, device) -> torch.Tensor:
    return torch.cat([ring_positions(total, ring_size, r, layout, device) for r in range(ring_size)])
