"""Packed streams sharded by documents: which tokens of which document each rank holds, and in what order.

A packed stream is documents one after another (global boundaries `bounds`, cu_seqlens). Attention never
crosses a document, so what a rank's causal work costs is not its share of the stream but the sum, over its
query tokens, of the keys each sees in its own document: a token at position p of its document sees p + 1 keys
(causal), the whole document otherwise. Splitting the stream into equal runs of positions (`shard_sequence`)
balances that only by chance. This layout balances it by construction, and splits a document over as few ranks
as the balance needs:

* A document is *split over m ranks* (a *group* of m consecutive ranks, cyclically) when one rank holding it
  would carry more than a share of a rank's mean tokens or mean counted work: m is the fewest ranks that keep
  each one's part within that share. It is cut into 2m chunks of near-equal size, c_0..c_(2m-1), and the j-th
  rank of the group holds c_j and c_(2m-1-j) (the zigzag of TransformerEngine's THD layout, per document and
  group). With equal chunks of s tokens, the pair's counted work is 2m s^2 + s whatever j is: every rank of the
  group gets the same share of the document, in tokens and in work. The tokens left over when the length does
  not divide by 2m go one per chunk to the group's ranks holding the fewest tokens so far.
* With m = 1 the document stays *whole* on one rank: it costs nothing to attend, no other rank holds any of its
  keys.
* Documents are placed by decreasing part per rank, each on the group (or rank) whose larger normalised load
  (tokens over the mean, work over the mean) stays smallest: a greedy fill (longest processing time first) whose
  excess over the mean stays within the largest part. Whole documents then move (or swap) off the most loaded
  rank while that lowers it (`_rebalanced`), which undoes most of that excess.
* Which documents to split, and over how many ranks: a grouping is valid when every rank stays within
  BALANCE_TARGET of the mean, and the valid one whose split documents make the fewest pairs of ranks share a
  document is taken (each such pair is a ring step that computes and sends). Three searches propose one: groups
  grown one rank at a time from the coarsest share, each time for the largest part on the most loaded rank
  (`_grown`), the same looking one step ahead over its LOOKAHEAD largest parts, and one share for every document,
  coarsest first (GROUP_SHARES, `_coarsest`). If none is valid, every document over SPLIT_SHARE is split over all
  ranks and the others are kept whole (`_spread`). On long-tailed mixes most documents stay whole and the few
  long ones go over two or three ranks.

Why not split every document over all ranks (pure THD): a document split W ways sends its keys to every other
rank and runs as 2W short pieces, which is all cost for documents far shorter than a shard: kernels work in
tiles of 128 rows and keys, and a 4k document over 8 ranks is chunks of 256. Why not whole documents only: one
document longer than a rank's fair share, or a long tail of them, unbalances the ranks. A group of consecutive
ranks keeps the pairs of ranks that share documents few: ring steps between ranks that share none are skipped
(nothing is computed and nothing is sent).

Local order (what `shard_packed` returns): first the split documents, in document order, each as its early chunk
(c_j) followed by its late chunk (c_(2m-1-j)); then the whole documents, in document order. Local order is
therefore global order within each document, so causal attention of a rank's tokens of one document against
themselves is top-left causal on local indices (the early chunk's positions all come before the late chunk's),
and every ring step is one kernel call whose sequences increase in rows and keys (cp/packed_plan.py). The keys
other ranks need are a contiguous range of the split documents; no one needs the whole documents.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .layout import even_sizes

SPLIT_SHARE = 0.125  # a document over this share of a rank's mean tokens or counted work is split over all ranks
# The groupings tried, coarsest first: a document's largest part per rank, as a share of a rank's mean load.
GROUP_SHARES = (1.0, 0.85, 0.7, 0.6, 0.5, 0.42, 0.35, 0.3, 0.25, 0.2, 0.15, 0.125)
BALANCE_TARGET = 1.05  # the largest rank's tokens and counted work over the mean that a grouping must keep
REBALANCED = 1.02  # whole documents move off the most loaded rank until it is within this of the mean
SWAP_PARTNERS = 3  # the least loaded ranks a document may be swapped with
REBALANCE_ROUNDS = 4  # moves or swaps per rank, at most
LOOKAHEAD = 3  # documents of the most loaded rank tried per growth step, in the look-ahead search
CHUNK_TILE = 128  # early chunks of split documents are multiples of this (see _split_sizes): the row tiles of
# FA4's sm90 backward (64 or 128 rows)
REGIONS = ("early", "late", "whole")  # a run's place in its document's split (whole: not split)


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
        groups, chunks, owners = _assign(self.lengths, world)
        self.groups = groups  # split document -> the ranks holding it, in chunk order
        self.split = tuple(doc in groups for doc in range(len(self.lengths)))  # per document: cut into chunks
        self._chunks = chunks  # split document -> its 2m chunk sizes (m ranks)
        self.owner = owners  # whole document -> its rank
        self.runs = tuple(self._runs_of(r) for r in range(world))
        self._by_doc = tuple({} for _ in range(world))
        for r, runs in enumerate(self.runs):
            for run in runs:
                self._by_doc[r].setdefault(run.doc, []).append(run)

    def _runs_of(self, rank: int) -> tuple[Run, ...]:
        split, whole = [], []
        for doc, (start, length) in enumerate(zip(self.bounds, self.lengths)):
            if doc in self._chunks:
                group, sizes = self.groups[doc], self._chunks[doc]
                if rank not in group:
                    continue
                j = group.index(rank)
                for region, c in (("early", j), ("late", 2 * len(group) - 1 - j)):
                    a = start + sum(sizes[:c])
                    if sizes[c]:
                        split.append((doc, a, a + sizes[c], region))
            elif length and self.owner.get(doc) == rank:
                whole.append((doc, start, start + length, "whole"))
        runs, local = [], 0
        for doc, a, b, region in split + whole:
            runs.append(Run(doc, a, b, local, region))
            local += b - a
        return tuple(runs)

    # -- what each rank holds -----------------------------------------------------------------------------------

    def length(self, rank: int) -> int:
        runs = self.runs[rank]
        return runs[-1].local_stop if runs else 0

    def part(self, rank: int, index: int, parts: int) -> tuple[int, int]:
        """Local range [a, b) of the `index`-th of `parts` consecutive parts of `rank`'s shard, of near-equal
        lengths (larger ones first): on a 2-D mesh the Ulysses ranks of one ring rank each hold one, and their
        all-to-all concatenates them back into the shard."""
        sizes = even_sizes(self.length(rank), parts)
        start = sum(sizes[:index])
        return start, start + sizes[index]

    def split_stop(self, rank: int) -> int:
        """Local index where `rank`'s split documents end (its whole documents follow)."""
        return max((run.local_stop for run in self.runs[rank] if run.region != "whole"), default=0)

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
    """(split document -> its ranks in chunk order, split document -> chunk sizes, whole document -> rank): of the
    groupings that keep every rank within BALANCE_TARGET (`_grown` without and with a look ahead, `_coarsest`),
    the one whose split documents make the fewest pairs of ranks share a document, else every long document over
    all ranks (see the module docstring)."""
    grown = _grown(lengths, world, 1)
    if grown is not None and not grown[0]:  # nothing split: no grouping shares less
        return grown
    found = [a for a in (grown, _coarsest(lengths, world)) if a is not None]
    bound = min((_sharing_cost(lengths, a)[0] for a in found), default=math.inf)
    ahead = _grown(lengths, world, LOOKAHEAD, bound)
    found += [ahead] if ahead is not None else []
    if not found:
        return _spread(lengths, world)
    return min(found, key=lambda a: _sharing_cost(lengths, a))


def _sharing_cost(lengths: tuple[int, ...], assigned) -> tuple[int, int]:
    """(ordered pairs of ranks that share a split document, query rows those pairs attend across ranks): each such
    pair is a ring step that runs a kernel call and sends keys."""
    groups = assigned[0]
    pairs = {(r, s) for group in groups.values() for r in group for s in group if r != s}
    return len(pairs), sum(lengths[d] * (len(g) - 1) for d, g in groups.items())


def _coarsest(lengths: tuple[int, ...], world: int):
    """The coarsest grouping in GROUP_SHARES (one share for every document) that, rebalanced, keeps every rank
    within BALANCE_TARGET, or None."""
    loads = _Loads(lengths, world)
    for share in GROUP_SHARES:
        sizes = {d: _group_size(n, loads, world, share) for d, n in enumerate(lengths) if n}
        assigned = _rebalanced(lengths, world, _grouped(lengths, world, sizes))
        if _imbalance(lengths, world, assigned) <= BALANCE_TARGET:
            return assigned
    return None


def _grown(lengths: tuple[int, ...], world: int, tries: int, bound: float = math.inf):
    """Groups grown one rank at a time where the balance needs it, or None: from the coarsest share (every
    document that one rank could hold within its mean stays whole), while the most loaded rank is over
    BALANCE_TARGET, one of the `tries` documents with the largest parts on it is split over one more rank (the
    one whose placement and rebalancing leave the most loaded rank lowest). None once `bound` pairs of ranks share
    a document: growing only adds pairs, and a grouping with that many is already known."""
    loads = _Loads(lengths, world)
    sizes = {d: _group_size(n, loads, world, GROUP_SHARES[0]) for d, n in enumerate(lengths) if n}
    assigned, worst, top = _placed(lengths, world, sizes)
    for _ in range(world * world):
        if worst <= BALANCE_TARGET:
            return assigned
        if _sharing_cost(lengths, assigned)[0] >= bound:
            return None
        groups, _, owners = assigned
        held = [d for d, r in owners.items() if r == top] + [d for d, g in groups.items() if top in g]
        growable = sorted((d for d in held if sizes[d] < min(world, lengths[d] // 2)),
                          key=lambda d: (-loads.share(lengths[d]) / sizes[d], d))[:tries]
        if not growable:
            return None
        options = [{**sizes, doc: sizes[doc] + 1} for doc in growable]
        placed = [_placed(lengths, world, option) for option in options]
        i = min(range(len(options)), key=lambda j: placed[j][1])
        sizes, (assigned, worst, top) = options[i], placed[i]
    return None


def _placed(lengths: tuple[int, ...], world: int, sizes: dict[int, int]):
    """(assignment, the largest normalised load, its rank) of the group sizes `sizes`, placed and rebalanced."""
    assigned = _rebalanced(lengths, world, _grouped(lengths, world, sizes))
    after = _loads_of(lengths, world, assigned)
    top = max(range(world), key=lambda r: (after.norm(r), -r))
    return assigned, after.norm(top), top


class _Loads:
    """Tokens and counted causal work per rank as documents are placed, and their larger normalised load."""

    def __init__(self, lengths: tuple[int, ...], world: int):
        self.tokens, self.work = [0] * world, [0] * world
        self.mean_tokens = sum(lengths) / world
        self.mean_work = sum(causal_work(n) for n in lengths) / world

    def norm(self, rank: int, tokens: float = 0, work: float = 0) -> float:
        t = (self.tokens[rank] + tokens) / self.mean_tokens if self.mean_tokens else 0.0
        w = (self.work[rank] + work) / self.mean_work if self.mean_work else 0.0
        return max(t, w)

    def norms(self, rank: int, tokens: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
        """`norm` of `rank` for many changes at once."""
        t = (self.tokens[rank] + tokens) / self.mean_tokens if self.mean_tokens else torch.zeros_like(tokens)
        w = (self.work[rank] + work) / self.mean_work if self.mean_work else torch.zeros_like(work)
        return torch.maximum(t, w)

    def share(self, n: int) -> float:
        """A document of `n` tokens as a share of one rank's mean: the larger of its tokens' and its work's."""
        t = n / self.mean_tokens if self.mean_tokens else 0.0
        w = causal_work(n) / self.mean_work if self.mean_work else 0.0
        return max(t, w)

    def place_whole(self, rank: int, n: int) -> None:
        self.tokens[rank] += n
        self.work[rank] += causal_work(n)


def _group_size(n: int, loads: _Loads, world: int, share: float) -> int:
    """Ranks a document of `n` tokens is split over: the fewest that keep each one's part within `share` of a
    rank's mean tokens and work (1: whole), at most `world` and at most n // 2 (every chunk a token)."""
    return max(1, min(world, n // 2, math.ceil(loads.share(n) / share - 1e-9)))


def _grouped(lengths: tuple[int, ...], world: int, sizes: dict[int, int]):
    """Each document over `sizes[doc]` consecutive ranks (cyclically), largest parts first, each on the window of
    ranks whose larger normalised load stays smallest."""
    loads = _Loads(lengths, world)
    order = sorted(sizes, key=lambda d: (-loads.share(lengths[d]) / sizes[d], d))
    groups, chunks, owners = {}, {}, {}
    for doc in order:
        n, m = lengths[doc], sizes[doc]
        if m == 1:
            work = causal_work(n)
            owners[doc] = min(range(world), key=lambda r: (loads.norm(r, n, work), r))
            loads.place_whole(owners[doc], n)
        else:
            windows = [tuple((start + j) % world for j in range(m)) for start in range(world if m < world else 1)]
            group = min(windows, key=lambda g: (max(loads.norm(r, n / m, causal_work(n) / m) for r in g), g[0]))
            groups[doc] = group
            chunks[doc] = _split_sizes(n, group, loads.tokens, loads.work)
    return groups, chunks, owners


def _loads_of(lengths: tuple[int, ...], world: int, assigned) -> _Loads:
    """Tokens and counted work per rank under `assigned`."""
    groups, chunks, owners = assigned
    loads = _Loads(lengths, world)
    for doc, rank in owners.items():
        loads.place_whole(rank, lengths[doc])
    for doc, group in groups.items():
        start = 0
        for c, size in enumerate(chunks[doc]):
            r = group[c if c < len(group) else 2 * len(group) - 1 - c]
            loads.tokens[r] += size
            loads.work[r] += _prefix_work(start, start + size)
            start += size
    return loads


def _imbalance(lengths: tuple[int, ...], world: int, assigned) -> float:
    """The largest rank's larger normalised load (tokens or counted work over the mean) under `assigned`."""
    loads = _loads_of(lengths, world, assigned)
    return max(loads.norm(r) for r in range(world))


def _rebalanced(lengths: tuple[int, ...], world: int, assigned):
    """`assigned` with whole documents moved off the most loaded rank until it is within REBALANCED (or no move
    lowers it): the greedy fill places the largest parts first and can leave a rank over the mean by up to one
    part, which coarse groupings make large; a rank's whole documents are the items that can still move.

    Each round takes, on the most loaded rank, the move of one whole document to another rank that leaves the
    larger of the two ranks' loads smallest, or if no move lowers it, the swap with a smaller document of one of
    the SWAP_PARTNERS least loaded ranks; at most REBALANCE_ROUNDS rounds per rank."""
    groups, chunks, owners = assigned
    owners = dict(owners)
    loads = _loads_of(lengths, world, assigned)
    held = [[] for _ in range(world)]
    for doc, rank in owners.items():
        held[rank].append(doc)
    for _ in range(REBALANCE_ROUNDS * world):
        top = max(range(world), key=lambda r: (loads.norm(r), -r))
        if loads.norm(top) <= REBALANCED:
            break
        step = _best_move(lengths, loads, held, top) or _best_swap(lengths, loads, held, top)
        if step is None:
            break
        doc, to, back = step
        _transfer(lengths, loads, held, owners, doc, top, to)
        if back is not None:
            _transfer(lengths, loads, held, owners, back, to, top)
    return groups, chunks, owners


def _best_move(lengths, loads: _Loads, held: list[list[int]], top: int):
    """(document, rank, None): the move of one of `top`'s whole documents that most lowers the larger load of
    `top` and the rank it goes to, or None where none lowers it."""
    best, worst = None, loads.norm(top)
    for doc in held[top]:
        n, w = lengths[doc], causal_work(lengths[doc])
        for to in range(len(held)):
            if to != top:
                after = max(loads.norm(top, -n, -w), loads.norm(to, n, w))
                if after < worst:
                    best, worst = (doc, to, None), after
    return best


def _best_swap(lengths, loads: _Loads, held: list[list[int]], top: int):
    """(document, rank, its document): the swap of one of `top`'s whole documents with a shorter one of one of the
    SWAP_PARTNERS least loaded ranks that most lowers the larger load of the two, or None. Every pair of
    documents is scored at once (thousands of short documents make millions of pairs), in float64, where counted
    work is exact; ties go to the first pair, so every rank picks the same."""
    partners = sorted((r for r in range(len(held)) if r != top), key=loads.norm)[:SWAP_PARTNERS]
    if not held[top]:
        return None
    mine = torch.tensor([lengths[d] for d in held[top]], dtype=torch.float64)
    best, worst = None, loads.norm(top)
    for to in partners:
        if not held[to]:
            continue
        theirs = torch.tensor([lengths[d] for d in held[to]], dtype=torch.float64)
        dn = theirs[None, :] - mine[:, None]  # tokens `top` gains (negative: it gives more than it takes)
        dw = (theirs * (theirs + 1) / 2)[None, :] - (mine * (mine + 1) / 2)[:, None]
        after = torch.maximum(loads.norms(top, dn, dw), loads.norms(to, -dn, -dw))
        after = torch.where(dn < 0, after, math.inf)
        i = int(after.argmin())
        if after.view(-1)[i].item() < worst:
            worst = after.view(-1)[i].item()
            best = (held[top][i // len(held[to])], to, held[to][i % len(held[to])])
    return best


def _transfer(lengths, loads: _Loads, held: list[list[int]], owners: dict, doc: int, src: int, dst: int) -> None:
    n, w = lengths[doc], causal_work(lengths[doc])
    held[src].remove(doc)
    held[dst].append(doc)
    owners[doc] = dst
    loads.tokens[src] -= n
    loads.work[src] -= w
    loads.tokens[dst] += n
    loads.work[dst] += w


def _spread(lengths: tuple[int, ...], world: int):
    """Every document over SPLIT_SHARE of a rank's mean tokens or work split over all ranks, the others whole,
    by decreasing counted work, each on the rank whose larger normalised load stays smallest."""
    loads = _Loads(lengths, world)
    everyone = tuple(range(world))
    split = [world > 1 and n >= 2 and (n > SPLIT_SHARE * loads.mean_tokens
                                       or causal_work(n) > SPLIT_SHARE * loads.mean_work) for n in lengths]
    groups, chunks, owners = {}, {}, {}
    for doc, n in enumerate(lengths):
        if split[doc]:
            groups[doc] = everyone
            chunks[doc] = _split_sizes(n, everyone, loads.tokens, loads.work)
    whole = sorted((d for d, n in enumerate(lengths) if n and not split[d]), key=lambda d: (-lengths[d], d))
    for doc in whole:
        n = lengths[doc]
        rank = min(range(world), key=lambda r: (loads.norm(r, n, causal_work(n)), r))
        owners[doc] = rank
        loads.place_whole(rank, n)
    return groups, chunks, owners


def _split_sizes(n: int, group: tuple[int, ...], tokens: list[int], load: list[int]) -> tuple[int, ...]:
    """2m chunk sizes of a document of `n` tokens over the m ranks `group` (rank group[j] holds chunks j and
    2m-1-j): near-equal, the remainder one per chunk to the ranks holding the fewest tokens (early chunks first,
    then late); updates `tokens` and `load` (counted work) per rank.

    Where a chunk holds at least CHUNK_TILE tokens, the early chunks are a multiple of CHUNK_TILE (the nearest
    to an equal share) and the late chunks share the rest: a rank's late chunk then starts a whole number of
    tiles into its run of the document, so a kernel's row tiles over the late chunk alone (a ring step's) are
    tiles of the rank's whole run too (its diagonal step's), and the backward's steps can add into one dQ
    accumulator (providers/flash/fa4_sm90_backward.py). Every rank still holds the same tokens of the document;
    an early and a late chunk now differ by up to a tile, which moves counted work between the group's ranks by
    up to (CHUNK_TILE + 1) rows of a chunk pair per rank (the layout's balance moved by at most 0.002 on the
    packed ring benchmark's mixes)."""
    m = len(group)
    base, extra = divmod(n, 2 * m)
    whole_tiles = base >= CHUNK_TILE  # early chunks in whole tiles, the remainder to the late ones
    early = (n + m * CHUNK_TILE) // (2 * m * CHUNK_TILE) * CHUNK_TILE if whole_tiles else base  # the nearest
    late, extra = divmod(n - m * early, m) if whole_tiles else (base, extra)
    sizes = [early] * m + [late] * m
    order = sorted(range(m), key=lambda j: (tokens[group[j]], load[group[j]], group[j]))
    for i in range(extra):
        j = order[i % m]
        sizes[j if i < m and not whole_tiles else 2 * m - 1 - j] += 1
    start = 0
    for c, size in enumerate(sizes):
        r = group[c if c < m else 2 * m - 1 - c]
        tokens[r] += size
        load[r] += _prefix_work(start, start + size)
        start += size
    return tuple(sizes)


@functools.lru_cache(maxsize=64)
def document_layout(bounds: tuple[int, ...], world: int) -> DocumentLayout:
    """The document layout of the stream `bounds` over `world` ranks (cached: every call of a training step asks
    for the same one)."""
    return DocumentLayout(tuple(int(b) for b in bounds), int(world))
