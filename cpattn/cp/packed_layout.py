"""Packed streams sharded by documents: which tokens of which document each rank holds, and in what order.

A packed stream is documents one after another (global boundaries `bounds`, cu_seqlens). Attention never
crosses a document, so what a rank's causal work costs is not its share of the stream but the sum, over its
query tokens, of the keys each sees in its own document: a token at position p of its document sees p + 1 keys
(causal), the whole document otherwise. Splitting the stream into equal runs of positions (`shard_sequence`)
balances that only by chance. This layout balances it by construction, and keeps short documents whole:

* A document is *split* when it is long enough that one rank holding it would carry more than SPLIT_SHARE of a
  rank's mean tokens or mean counted work. It is cut into 2W chunks of near-equal size, c_0..c_(2W-1), and rank
  r holds c_r and c_(2W-1-r) (the zigzag of TransformerEngine's THD layout, per document). With equal chunks of
  s tokens, the pair's counted work is 2W s^2 + s whatever r is: every rank gets the same share of every split
  document, in tokens and in work. The tokens left over when the length does not divide by 2W go one per chunk
  to the ranks holding the fewest tokens so far.
* Every other document stays *whole* on one rank: by decreasing counted work, each goes to the rank whose larger
  normalised load (tokens over the mean, work over the mean) stays smallest. Each such document is below
  SPLIT_SHARE of the mean in both, so the greedy fill stays within that share of the mean (longest-processing-
  time bound), and it costs nothing to attend: no other rank holds any of its keys.

Why not split every document (pure THD): a document split W ways sends its keys to every other rank and runs as
2W short pieces, which is all cost for documents far shorter than a shard. Why not whole documents only: one
document longer than a rank's fair share, or a long tail of them, unbalances the ranks. Kept whole, short
documents make ring steps that share no document with the local queries, which the ring skips (nothing is
computed and nothing is sent).

Local order (what `shard_packed` returns): first the early chunks of the split documents (c_r, in document
order), then their late chunks (c_(2W-1-r)), then the whole documents, in document order. The ranges other
ranks need are then contiguous views of the shard: a later rank's causal queries see only early chunks (the
first region), an earlier rank's see both (the first two regions), no one needs the third. Within each region,
local order is global order, so causal attention of a run against itself is top-left causal on local indices.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

SPLIT_SHARE = 0.125  # a document over this share of a rank's mean tokens or counted work is split over all ranks
REGIONS = ("early", "late", "whole")


@dataclass(frozen=True)
class Run:
    """Consecutive tokens of one document that one rank holds: global positions [start, stop), at local index
    `local` onwards."""

    doc: int
    start: int
    stop: int
    local: int
    region: str

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def local_stop(self) -> int:
        return self.local + self.size


def causal_work(length: int) -> int:
    """(query, key) pairs of causal attention within one document of `length` tokens."""
    return length * (length + 1) // 2


def _prefix_work(a: int, b: int) -> int:
    """Counted causal work of the tokens at document positions [a, b): sum of (p + 1)."""
    return causal_work(b) - causal_work(a)


class DocumentLayout:
    """The document sharding of one packed stream over `world` ranks (see the module docstring). Built once per
    (bounds, world) by `document_layout`; identical on every rank, since it reads nothing but those."""

    def __init__(self, bounds: tuple[int, ...], world: int):
        self.bounds, self.world = bounds, world
        self.lengths = tuple(b - a for a, b in zip(bounds, bounds[1:]))
        split, chunks, owners = _assign(self.lengths, world)
        self.split = split  # per document: cut into 2W chunks
        self._chunks = chunks  # split document -> its 2W chunk sizes
        self.owner = owners  # whole document -> its rank
        self.runs = tuple(self._runs_of(r) for r in range(world))
        self._by_doc = tuple({} for _ in range(world))
        for r, runs in enumerate(self.runs):
            for run in runs:
                self._by_doc[r].setdefault(run.doc, []).append(run)

    def _runs_of(self, rank: int) -> tuple[Run, ...]:
        pieces = {region: [] for region in REGIONS}
        for doc, (start, length) in enumerate(zip(self.bounds, self.lengths)):
            if doc in self._chunks:
                sizes = self._chunks[doc]
                for region, c in (("early", rank), ("late", 2 * self.world - 1 - rank)):
                    a = start + sum(sizes[:c])
                    if sizes[c]:
                        pieces[region].append((doc, a, a + sizes[c]))
            elif length and self.owner.get(doc) == rank:
                pieces["whole"].append((doc, start, start + length))
        runs, local = [], 0
        for region in REGIONS:
            for doc, a, b in pieces[region]:
                runs.append(Run(doc, a, b, local, region))
                local += b - a
        return tuple(runs)

    # -- what each rank holds -----------------------------------------------------------------------------------

    def length(self, rank: int) -> int:
        runs = self.runs[rank]
        return runs[-1].local_stop if runs else 0

    def region_stop(self, rank: int, region: str) -> int:
        """Local index where `region` (and the regions before it) ends on `rank`."""
        stop = 0
        for run in self.runs[rank]:
            if REGIONS.index(run.region) <= REGIONS.index(region):
                stop = run.local_stop
        return stop

    def runs_of_doc(self, rank: int, doc: int) -> list[Run]:
        return self._by_doc[rank].get(doc, [])

    def shared_docs(self, rank: int, other: int) -> list[int]:
        """Documents both ranks hold tokens of, in document order."""
        mine, theirs = self._by_doc[rank], self._by_doc[other]
        return sorted(d for d in mine if d in theirs)

    def positions(self, rank: int) -> list[int]:
        """Global positions of `rank`'s tokens, in local order."""
        return [p for run in self.runs[rank] for p in range(run.start, run.stop)]

    def position_ids(self, rank: int) -> list[int]:
        """Each local token's position within its document (what RoPE needs)."""
        return [p - self.bounds[run.doc] for run in self.runs[rank] for p in range(run.start, run.stop)]

    def local_cu_seqlens(self, rank: int) -> list[int]:
        """Boundaries of the local runs, each a piece of one document, in local order (a split document gives two:
        its early and its late chunk)."""
        cu = [0]
        for run in self.runs[rank]:
            cu.append(run.local_stop)
        return cu

    def local_documents(self, rank: int) -> list[int]:
        """The document of each local run (`local_cu_seqlens`' segments)."""
        return [run.doc for run in self.runs[rank]]

    def counted_work(self, rank: int, causal: bool = True) -> int:
        """(query, key) pairs `rank`'s queries attend: per token, the keys of its document it may see."""
        total = 0
        for run in self.runs[rank]:
            a, b = run.start - self.bounds[run.doc], run.stop - self.bounds[run.doc]
            total += _prefix_work(a, b) if causal else (b - a) * self.lengths[run.doc]
        return total

    def balance(self, causal: bool = True) -> float:
        """The largest rank's counted work over the mean (1.0: perfectly balanced)."""
        work = [self.counted_work(r, causal) for r in range(self.world)]
        mean = sum(work) / self.world
        return max(work) / mean if mean else 1.0

    def gather_order(self) -> torch.Tensor:
        """For the concatenation of every rank's shard in rank order: the index of each global position in it."""
        positions = torch.tensor([p for r in range(self.world) for p in self.positions(r)], dtype=torch.long)
        return torch.argsort(positions)


def _assign(lengths: tuple[int, ...], world: int):
    """(split flags, split document -> chunk sizes, whole document -> rank), as the module docstring says."""
    work = [causal_work(n) for n in lengths]
    mean_tokens, mean_work = sum(lengths) / world, sum(work) / world
    split = tuple(world > 1 and n >= 2 and (n > SPLIT_SHARE * mean_tokens or w > SPLIT_SHARE * mean_work)
                  for n, w in zip(lengths, work))
    tokens, load = [0] * world, [0] * world
    chunks = {}
    for doc, n in enumerate(lengths):
        if split[doc]:
            chunks[doc] = _split_sizes(n, world, tokens, load)
    owners = {}
    norm = lambda t, w: max(t / mean_tokens if mean_tokens else 0.0, w / mean_work if mean_work else 0.0)  # noqa
    whole = sorted((d for d, n in enumerate(lengths) if n and not split[d]), key=lambda d: (-work[d], d))
    for doc in whole:
        rank = min(range(world), key=lambda r: (norm(tokens[r] + lengths[doc], load[r] + work[doc]), r))
        owners[doc] = rank
        tokens[rank] += lengths[doc]
        load[rank] += work[doc]
    return split, chunks, owners


def _split_sizes(n: int, world: int, tokens: list[int], load: list[int]) -> tuple[int, ...]:
    """2W chunk sizes of a document of `n` tokens: equal, the remainder one per chunk to the ranks holding the
    fewest tokens (early chunks first, then late); updates `tokens` and `load` (counted work) per rank."""
    base, extra = divmod(n, 2 * world)
    sizes = [base] * (2 * world)
    order = sorted(range(world), key=lambda r: (tokens[r], load[r], r))
    for j in range(extra):
        r = order[j % world]
        sizes[r if j < world else 2 * world - 1 - r] += 1
    start = 0
    for c, size in enumerate(sizes):
        r = c if c < world else 2 * world - 1 - c
        tokens[r] += size
        load[r] += _prefix_work(start, start + size)
        start += size
    return tuple(sizes)


@functools.lru_cache(maxsize=64)
def document_layout(bounds: tuple[int, ...], world: int) -> DocumentLayout:
    """The document layout of the stream `bounds` over `world` ranks (cached: every call of a training step asks
    for the same one)."""
    return DocumentLayout(tuple(int(b) for b in bounds), int(world))
