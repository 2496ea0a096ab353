"""What one step of the packed ring computes: a rank's queries against the keys one rank holds, per document.

For a consumer rank (its queries) and an owner rank (its keys), every document both hold gives *pieces*: one
run of the consumer's against one run of the owner's (cp/packed_layout.py's runs are disjoint ranges of global
positions). Causal: the owner's run entirely before the consumer's is attended in full; a run after is not
attended; on the diagonal step (the rank's own keys) the rank's runs of one document, which the layout keeps
consecutive and in global order, are one causal piece, top-left (exact: local order is global order within a
document, and a document's early chunk comes wholly before its late chunk). Non-causal: every pair in full.
No pieces: the step is skipped.

With a window (left, right), positions are offsets within the document: a query at offset i sees the keys of its
own document at offsets i - left .. i + right (causal: right 0). Both runs of a piece lie in one document, so the
band in the piece's own top-left coordinates is the window shifted by the difference of the runs' starts
(ops/window.shifted), and `trim_block` cuts the piece to the rows and keys the band reaches: a piece it does not
reach is dropped like a masked one (no work, and a step left without pieces sends nothing), and the band of
what is left (`Piece.window`, sides >= 0 or None) goes with it to the kernel. Keys no piece reaches are not
sent either: the step's key ranges are the trimmed pieces' keys.

The owner sends the consumer only the keys its pieces read, as ranges of its shard (`kv`: views, sent one after
another, received one after another into one block): within its split documents, never its whole documents.

A kernel call takes sequences whose query rows and key rows both increase, one causal flag for all. Pieces are
therefore merged where they share rows and touch (one query run against two adjacent key runs is one piece),
then dealt into *chains*: each chain a list of pieces increasing in both, one kernel call. With the layout's
order a step without a window is one chain: per shared document, the consumer's late chunk against the owner's
early and late chunks (the owner earlier in the group) or both its chunks against the owner's early chunk (the
owner later), and on the diagonal step one causal piece per document.

For a varlen kernel a chain is one call on views of the chain's rows and keys: each piece a sequence, and the
rows and keys between pieces sequences of their own with nothing to attend (zero keys, or zero queries), so that
the views need no copy. Their rows come back with log-sum-exp -inf, which merges as nothing.
For a provider that takes dense masks, a chain is split into *groups*: consecutive pieces whose bounding block is
at most twice their own area (or small, MIN_GROUP_CELLS), one call each with the block's document mask (each
piece's band in it), a lone piece with no mask, its own causal flag or band; for a provider without masks, every piece is a call of its own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..ops.window import TrimmedBlock, local_band_mask, shifted, trim_block, window_band
from .packed_layout import DocumentLayout

MIN_GROUP_CELLS = 128 * 128  # a masked block this small costs about a kernel launch whatever its mask


@dataclass(frozen=True)
class Piece:
    """Query rows [q0, q1) of the consumer's shard against key rows [k0, k1) of the owner's: every pair, the
    causal (top-left) ones, or those of the top-left band `window` (sides >= 0 or None; never with `causal`,
    the band holds causality)."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    window: "tuple[int | None, int | None] | None" = None

    @property
    def cells(self) -> int:
        return (self.q1 - self.q0) * (self.k1 - self.k0)

    @property
    def full(self) -> bool:
        """Every (row, key) pair attended: pieces that merge with their neighbours."""
        return not self.causal and self.window is None

    def moved(self, dq: int, dk: int) -> "Piece":
        """The same piece with its rows moved by -dq and its keys by -dk."""
        return Piece(self.q0 - dq, self.q1 - dq, self.k0 - dk, self.k1 - dk, self.causal, self.window)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: plans are cached, and chains key caches
class Chain:
    """One kernel call: rows [q0, q1) of the consumer's shard against keys [k0, k1) of the step's key block
    (the owner's `kv` range); `pieces` relative to those starts, increasing in both."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    pieces: tuple[Piece, ...]

    @functools.cached_property
    def sequences(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(cu_seqlens of the rows, of the keys) for a varlen call on the chain's views: each piece a sequence,
        rows and keys between pieces sequences with nothing to attend."""
        cu_q, cu_k = [0], [0]
        for p in self.pieces:
            if p.q0 > cu_q[-1]:  # rows no piece reads: zero keys
                cu_q.append(p.q0)
                cu_k.append(cu_k[-1])
            if p.k0 > cu_k[-1]:  # keys no piece reads: zero rows
                cu_q.append(cu_q[-1])
                cu_k.append(p.k0)
            cu_q.append(p.q1)
            cu_k.append(p.k1)
        return tuple(cu_q), tuple(cu_k)

    def groups(self, masks: bool) -> tuple["Chain", ...]:
        """The chain as dense calls (see the module docstring): sub-chains, relative to this chain's starts."""
        return _groups(self, masks)


@dataclass(frozen=True, eq=False)
class StepPlan:
    """What a consumer computes against one owner's keys: the ranges `kv` of the owner's shard it reads
    (owner-local [a, b), increasing, disjoint), which make up the step's key block one after another, and the
    kernel calls on that block (their keys are block indices)."""

    kv: tuple[tuple[int, int], ...]
    chains: tuple[Chain, ...]

    @property
    def kv_len(self) -> int:
        return sum(b - a for a, b in self.kv)

    @property
    def cells(self) -> int:
        return sum(p.cells for c in self.chains for p in c.pieces)

    def owner_rows(self, k0: int, k1: int) -> list[tuple[int, int, int]]:
        """Block keys [k0, k1) as (block start, owner-local start, count) per range of `kv` they meet: where a
        chain's dK/dV part, in block order, goes in the owner's shard."""
        out, start = [], 0
        for a, b in self.kv:
            lo, hi = max(k0, start), min(k1, start + b - a)
            if lo < hi:
                out.append((lo, a + lo - start, hi - lo))
            start += b - a
        return out


def pieces(layout: DocumentLayout, consumer: int, owner: int, causal: bool, window=None) -> list[Piece]:
    """Every (consumer run x owner run) a step attends, in local coordinates of the two shards."""
    if window is not None:
        return _windowed_pieces(layout, consumer, owner, window_band(window, causal))
    out = []
    for doc in layout.shared_docs(consumer, owner):
        if consumer == owner:  # the rank's runs of the document are consecutive and in global order
            runs = layout.runs_of_doc(consumer, doc)
            out.append(Piece(runs[0].local, runs[-1].local_stop, runs[0].local, runs[-1].local_stop, causal))
            continue
        for mine in layout.runs_of_doc(consumer, doc):
            for theirs in layout.runs_of_doc(owner, doc):
                if not causal or theirs.stop <= mine.start:
                    out.append(Piece(mine.local, mine.local_stop, theirs.local, theirs.local_stop, False))
    return out


def _windowed_pieces(layout: DocumentLayout, consumer: int, owner: int, band) -> list[Piece]:
    """The pieces of a windowed step: every pair of runs of a shared document, cut to what its band reaches."""
    out = []
    for doc in layout.shared_docs(consumer, owner):
        for mine in layout.runs_of_doc(consumer, doc):
            for theirs in layout.runs_of_doc(owner, doc):
                cut = trim_block(mine.size, theirs.size, shifted(band, mine.start, theirs.start))
                if cut is not None:
                    out.append(_trimmed_piece(mine.local, theirs.local, cut))
    return out


def _trimmed_piece(q_start: int, k_start: int, cut: TrimmedBlock) -> Piece:
    """A trimmed block as a piece; a band that is only causal on a square block is the causal flag (which
    kernels take on their fastest paths, and which chains with the other causal pieces)."""
    rows, keys = cut.q1 - cut.q0, cut.k1 - cut.k0
    causal = cut.window == (None, 0) and rows == keys
    window = None if causal else cut.window
    return Piece(q_start + cut.q0, q_start + cut.q1, k_start + cut.k0, k_start + cut.k1, causal, window)


def _merge(items: list[Piece]) -> list[Piece]:
    """Join full pieces with the same rows and touching keys, then with the same keys and touching rows."""
    for key, touch, join in (
        (lambda p: (p.q0, p.q1, p.k0), lambda a, b: a.q0 == b.q0 and a.q1 == b.q1 and a.k1 == b.k0,
         lambda a, b: Piece(a.q0, a.q1, a.k0, b.k1, False)),
        (lambda p: (p.k0, p.k1, p.q0), lambda a, b: a.k0 == b.k0 and a.k1 == b.k1 and a.q1 == b.q0,
         lambda a, b: Piece(a.q0, b.q1, a.k0, a.k1, False)),
    ):
        merged: list[Piece] = []
        for p in sorted(items, key=key):
            if merged and p.full and merged[-1].full and touch(merged[-1], p):
                merged[-1] = join(merged[-1], p)
            else:
                merged.append(p)
        items = merged
    return items


def _chains(items: list[Piece]) -> tuple[Chain, ...]:
    """Deal pieces (sorted by rows) into the first chain they extend in rows, keys and causal flag."""
    open_chains: list[list[Piece]] = []
    for p in sorted(items, key=lambda p: (p.q0, p.k0)):
        for chain in open_chains:
            last = chain[-1]
            if last.causal == p.causal and last.q1 <= p.q0 and last.k1 <= p.k0:
                chain.append(p)
                break
        else:
            open_chains.append([p])
    out = []
    for chain in open_chains:
        q0, k0 = chain[0].q0, chain[0].k0
        rel = tuple(p.moved(q0, k0) for p in chain)
        out.append(Chain(q0, chain[-1].q1, k0, chain[-1].k1, chain[0].causal, rel))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def step_plan(layout: DocumentLayout, consumer: int, owner: int, causal: bool,
              window: "tuple[int | None, int | None] | None" = None) -> StepPlan | None:
    """The step of `consumer`'s queries against `owner`'s keys, or None when they share no attended pair;
    `window` per document (see the module docstring)."""
    items = [p for p in pieces(layout, consumer, owner, causal, window) if p.q1 > p.q0 and p.k1 > p.k0]
    if not items:
        return None
    if consumer == owner:  # the rank's own keys: one view of its shard, nothing travels
        kv = ((min(p.k0 for p in items), max(p.k1 for p in items)),)
    else:
        kv = _key_ranges(items)
    return StepPlan(kv, _chains(_merge([_in_block(p, kv) for p in items])))


def _key_ranges(items: list[Piece]) -> tuple[tuple[int, int], ...]:
    """The owner-local keys the pieces read, as increasing disjoint ranges (touching ones joined)."""
    ranges: list[list[int]] = []
    for k0, k1 in sorted((p.k0, p.k1) for p in items):
        if ranges and k0 <= ranges[-1][1]:
            ranges[-1][1] = max(ranges[-1][1], k1)
        else:
            ranges.append([k0, k1])
    return tuple((a, b) for a, b in ranges)


def _in_block(p: Piece, kv: tuple[tuple[int, int], ...]) -> Piece:
    """Piece `p` (owner-local keys) with its keys as indices of the block the ranges `kv` make up (its keys lie
    in one range: each range is a union of pieces' keys)."""
    start = 0
    for a, b in kv:
        if a <= p.k0 and p.k1 <= b:
            return p.moved(0, a - start)
        start += b - a
    raise AssertionError(f"piece keys [{p.k0}, {p.k1}) outside the step's ranges {kv}")


@functools.lru_cache(maxsize=4096)
def _groups(chain: Chain, masks: bool) -> tuple[Chain, ...]:
    if not masks:
        return tuple(Chain(p.q0, p.q1, p.k0, p.k1, p.causal, (p.moved(p.q0, p.k0),)) for p in chain.pieces)
    groups: list[list[Piece]] = []
    for p in chain.pieces:
        if groups:
            trial = groups[-1] + [p]
            box = (trial[-1].q1 - trial[0].q0) * (trial[-1].k1 - trial[0].k0)
            if box <= max(2 * sum(x.cells for x in trial), MIN_GROUP_CELLS):
                groups[-1] = trial
                continue
        groups.append([p])
    out = []
    for g in groups:
        q0, k0 = g[0].q0, g[0].k0
        rel = tuple(p.moved(q0, k0) for p in g)
        out.append(Chain(q0, g[-1].q1, k0, g[-1].k1, chain.causal, rel))
    return tuple(out)


def document_block_mask(chain: Chain, device) -> torch.Tensor:
    """(1, 1, rows, keys) bool: True where a row and a key are in the same piece (and, in a causal piece, the key
    is not after the row; in a windowed one, within its band)."""
    mask = torch.zeros(chain.q1 - chain.q0, chain.k1 - chain.k0, dtype=torch.bool, device=device)
    for p in chain.pieces:
        block = mask[p.q0:p.q1, p.k0:p.k1]
        block.fill_(True)
        if p.causal:
            block.tril_()
        if p.window is not None:
            block &= local_band_mask(p.q1 - p.q0, p.k1 - p.k0, p.window, device)
    return mask.view(1, 1, *mask.shape)
