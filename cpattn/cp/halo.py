"""Windowed ring attention: each rank fetches, once, only the keys its queries' window reaches (a halo).

Under a window (left, right) the query at global position p sees the keys [p - left, p + right]. A rank's
queries are one chunk of consecutive positions (contiguous layout) or two (zigzag), so the keys they reach are
one interval per chunk; inside another rank's shard those intervals are a few runs of consecutive tokens.
Where the window is shorter than a shard they are its neighbours' edges, and ranks further away are out of
reach: the rotating ring (ring.py), which passes every block to every rank, would move W - 1 shards per rank
where a few windows suffice.

The plan (`halo_plan`) lists, for every pair of ranks (r, s), the runs of s's keys that r's queries reach. It is
computed from the agreed total length, the layout and the band alone, so every rank derives the same plan and
nobody has to ask: a rank sends each peer exactly the runs that peer needs and receives exactly the runs it
needs.

Forward, on rank r:
1. Start every transfer at once: to each rank that needs some of r's keys, those runs of K and V (one message
   of each per peer); from each rank whose keys r needs, a buffer for its runs. Ranks out of reach exchange
   nothing.
2. While they travel, attend r's queries to its own keys.
3. Wait, then attend to each received run.
A block is one query chunk against one run of keys (each zigzag chunk is its own block rows): its window in the
block's own coordinates is `shifted(band, q start, k start)`, `trim_block` cuts the block to the rows and keys
the band reaches (a pair it does not reach is skipped; the rows it leaves out get nothing from this block), and
the block goes to the kernel through `scoremods.as_kernel_call` (a provider without windows gets the exact
mask of the trimmed block). The blocks' (out, lse) merge in float32 as in the ring.

Fused chunks (`RingSpec.fuse_halo`, off by default): a chunk's keys are consecutive positions (the halo before
it, the chunk, the halo after it), so they can be laid end to end and the chunk run as one kernel call with no
merge (`fused_plan`). That copies each chunk's keys and values once per direction; on one H100 (S = 128k, P = 8,
window 4k) the copies cost more than the calls they save under zigzag (docs/windows-softcap-sinks.md).

Backward, with the global (out, lse): the forward's received runs are kept (a halo is small: that is the point of
a window), so no key moves twice. The blocks against received runs run first; their dK/dV, summed per peer in
float32 and sent in the inputs' dtype, go back to the runs' owners in one exchange (the forward's in reverse)
while the blocks against the rank's own keys run; each rank then adds what came back to its own dK/dV.
dQ is summed over all blocks through the provider's `shared_rows_backward`, as in the ring.

Bytes each rank sends per layer (B, H_kv, D, element size e; a causal window (w - 1, 0) no longer than a zigzag
chunk, i.e. half a shard): under zigzag each chunk needs the last w - 1 keys before it, held by one neighbour,
so a rank sends at most two runs of w - 1 keys of K and V forward (and their dK, dV backward): about two windows,
against W - 1 shards for the rotating ring. Contiguous needs one run (one window); a two-sided window (left,
right) needs left + right keys per chunk.

Layouts. With a window every query sees at most left + right + 1 keys, so the contiguous layout is balanced by
itself (one run from one neighbour for a causal window). A model of both local (windowed) and global layers runs
one layout for all of them: zigzag, which balances the global causal layers, and its windowed layers then fetch
a halo for each of their two chunks, from the neighbours on both sides (rank r's early chunk from rank r - 1, its
late chunk from rank r + 1): two windows instead of one, still independent of W. A window that reaches most of
the sequence makes the plan close to an all-to-all; the schedule passes windows that reach everything for the
length (and a causal window unbounded on the left) to the rotating ring instead (`restricting_band`).
This module never names a provider.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..contract import AttentionCall, Provider, band
from ..masks import is_mask_mod, materialize_mask_mod, select_keys, select_queries
from ..ops import gradsum
from ..ops.merge import PartialAttention
from ..ops.window import shifted, trim_block
from ..scoremods import as_kernel_call
from .layout import ring_chunks
from .rows import StationaryRows, stationary_rows

Band = "tuple[int | None, int | None]"


@dataclass(frozen=True)
class Run:
    """Consecutive tokens: indices [start, stop) of the tensor that holds them, global positions from `position`."""

    start: int
    stop: int
    position: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class HaloPlan:
    """`queries[r]`: rank r's chunks as runs of its shard; `needs[r][s]`: the runs of rank s's shard that rank r's
    queries reach (empty where s == r, or out of reach)."""

    queries: tuple[tuple[Run, ...], ...]
    needs: tuple[tuple[tuple[Run, ...], ...], ...]

    def receives(self, me: int) -> dict[int, tuple[Run, ...]]:
        """peer -> the runs of its shard this rank needs, for the peers in reach, by rank."""
        return {s: runs for s, runs in enumerate(self.needs[me]) if runs}

    def sends(self, me: int) -> dict[int, tuple[Run, ...]]:
        """peer -> the runs of this rank's shard it needs, for the peers whose queries reach them, by rank."""
        return {r: need[me] for r, need in enumerate(self.needs) if need[me]}


def restricting_band(call: AttentionCall, total: int) -> "Band | None":
    """The band of `call`'s window, with the sides that reach every key of `total` left unbounded; None where
    that leaves nothing the rotating ring does not already do (no window, or a causal window unbounded on the
    left): those calls ring without a window."""
    if call.window is None:
        return None
    left, right = band(call)
    left = None if left is not None and left >= total - 1 else left
    right = None if right is not None and right >= total - 1 else right
    if left is None and (right is None or (call.is_causal and right == 0)):
        return None
    return left, right


def shard_runs(total: int, world: int, rank: int, layout: str) -> tuple[Run, ...]:
    """A rank's shard as runs of consecutive positions: its chunks (one, or two under zigzag), empty ones left out."""
    runs, offset = [], 0
    for chunk in ring_chunks(total, world, rank, layout):
        if chunk.size:
            runs.append(Run(offset, offset + chunk.size, chunk.start))
        offset += chunk.size
    return tuple(runs)


def _reach(queries: tuple[Run, ...], band_: Band, total: int) -> list[tuple[int, int]]:
    """The key positions [lo, hi) that some query of `queries` sees under `band_`, as sorted disjoint intervals:
    queries [a, b) reach [a - left, b + right)."""
    left, right = band_
    spans = sorted((0 if left is None else max(0, q.position - left),
                    total if right is None else min(total, q.position + q.size + right)) for q in queries)
    merged: list[tuple[int, int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        elif lo < hi:
            merged.append((lo, hi))
    return merged


def _within(runs: tuple[Run, ...], spans: list[tuple[int, int]]) -> tuple[Run, ...]:
    """The parts of `runs` whose positions lie in `spans`."""
    out = []
    for run in runs:
        for lo, hi in spans:
            a, b = max(run.position, lo), min(run.position + run.size, hi)
            if a < b:
                out.append(Run(run.start + a - run.position, run.start + b - run.position, a))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def halo_plan(total: int, world: int, layout: str, band_: Band) -> HaloPlan:
    """Which keys every rank needs from every other under `band_` (see the module docstring)."""
    queries = tuple(shard_runs(total, world, r, layout) for r in range(world))
    needs = tuple(tuple(() if s == r else _within(queries[s], _reach(queries[r], band_, total))
                        for s in range(world)) for r in range(world))
    return HaloPlan(queries, needs)


def packed(runs: tuple[Run, ...]) -> tuple[Run, ...]:
    """`runs` as they lie in the buffer that receives them one after another."""
    out, offset = [], 0
    for run in runs:
        out.append(Run(offset, offset + run.size, run.position))
        offset += run.size
    return tuple(out)


# -- blocks -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """Query rows `rows` (local) from global position `q_position` against keys `keys` of a key tensor from
    `k_position`, under `window` in the block's own coordinates (None: every key of the block)."""

    rows: slice
    q_position: int
    keys: slice
    k_position: int
    window: "Band | None"


def blocks(queries: tuple[Run, ...], keys: Run, band_: Band) -> list[Block]:
    """Every query chunk against one run of keys, each trimmed to what the band reaches; unreached pairs left out."""
    out = []
    for q in queries:
        cut = trim_block(q.size, keys.size, shifted(band_, q.position, keys.position))
        if cut is not None:
            out.append(Block(slice(q.start + cut.q0, q.start + cut.q1), q.position + cut.q0,
                             slice(keys.start + cut.k0, keys.start + cut.k1), keys.position + cut.k0, cut.window))
    return out


def block_call(provider: Provider, call: AttentionCall, block: Block, k: torch.Tensor, v: torch.Tensor,
               rows: StationaryRows) -> AttentionCall:
    """The kernel call of one block: its query rows, keys, the user's mask cut to both, its window (causality is
    in the band), no sinks (they enter once, after the merge), as the provider's kernel takes it."""
    n_rows, n_keys = block.rows.stop - block.rows.start, block.keys.stop - block.keys.start
    mask = call.attn_mask
    if is_mask_mod(mask):  # evaluated on this block's positions only
        q_pos = torch.arange(block.q_position, block.q_position + n_rows, device=call.device)
        k_pos = torch.arange(block.k_position, block.k_position + n_keys, device=call.device)
        mask = materialize_mask_mod(mask, call.batch, call.q_heads, q_pos, k_pos)
    elif mask is not None:  # (local rows x all keys in global order): the block's keys are one slice of them
        mask = select_queries(select_keys(mask, slice(block.k_position, block.k_position + n_keys)), block.rows)
    return as_kernel_call(provider, call.replace(
        query=rows.get("query", block.rows), key=k[:, :, block.keys], value=v[:, :, block.keys], attn_mask=mask,
        is_causal=False, window=block.window, sinks=None))


def halos(spec, band_: Band, received: tuple) -> list[tuple[int, torch.Tensor, torch.Tensor, tuple[Run, ...]]]:
    """(peer, K, V, the runs they hold) of every halo this rank received (`received`: K, V per peer, by rank)."""
    plan = halo_plan(spec.total, spec.group.size, spec.layout, band_)
    return [(peer, received[2 * i], received[2 * i + 1], packed(runs))
            for i, (peer, runs) in enumerate(plan.receives(spec.group.rank).items())]


# -- forward and backward ---------------------------------------------------------------------------------------

def _gather_runs(x: torch.Tensor, runs: tuple[Run, ...]) -> torch.Tensor:
    return torch.cat([x[:, :, run.start:run.stop] for run in runs], dim=2)


def _buffers(x: torch.Tensor, runs: tuple[Run, ...]) -> torch.Tensor:
    return x.new_empty(x.shape[:2] + (sum(run.size for run in runs),) + x.shape[3:])


# -- fused chunks: one kernel call per query chunk ---------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One run of keys a query chunk reaches: `tensor` is -1 for this rank's own keys, else the index of the
    received halo (in `halos` order); `run` indexes that tensor."""

    tensor: int
    run: Run


def reached_sources(chunk: Run, own: tuple[Run, ...], received: list[tuple[Run, ...]],
                    band_: Band) -> list[Source]:
    """The runs (own and received) that some query of `chunk` reaches under `band_`, by position."""
    found = [Source(i, run) for i, runs in [(-1, own)] + list(enumerate(received)) for run in runs
             if trim_block(chunk.size, run.size, shifted(band_, chunk.position, run.position)) is not None]
    return sorted(found, key=lambda source: source.run.position)


def contiguous(sources: list[Source]) -> bool:
    """Whether the runs follow each other without a gap in positions: then they are one run of keys."""
    return all(a.run.position + a.run.size == b.run.position for a, b in zip(sources, sources[1:]))


# A fused chunk's keys are copied end to end: at most this many chunks' worth (the halo before it, the chunk, the
# halo after it), so a window that reaches far does not copy most of the sequence once per chunk.
FUSED_KEYS = 3


def fused_plan(plan: HaloPlan, me: int, band_: Band) -> "tuple[tuple[Run, tuple[Source, ...]], ...] | None":
    """Per query chunk, the runs of keys it reaches, when for every chunk they are consecutive positions (a
    window no longer than a chunk: the halo before it, the chunk itself, the halo after it): each chunk is then
    one kernel call on those keys laid end to end, with no merge. None where some chunk's keys have a gap (a
    window that reaches a zigzag rank's other chunk, or beyond a neighbour's shard), or where they are more than
    FUSED_KEYS chunks' worth: the blocks go one by one."""
    received = list(packed(runs) for runs in plan.receives(me).values())
    out = []
    for chunk in plan.queries[me]:
        sources = reached_sources(chunk, plan.queries[me], received, band_)
        if sources and not contiguous(sources) or sum(s.run.size for s in sources) > FUSED_KEYS * chunk.size:
            return None
        out.append((chunk, tuple(sources)))
    return tuple(out)


def _laid_end_to_end(x: torch.Tensor, halos_x: list[torch.Tensor], sources: tuple[Source, ...]) -> torch.Tensor:
    parts = [(x if s.tensor < 0 else halos_x[s.tensor])[:, :, s.run.start:s.run.stop] for s in sources]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _fused_blocks(chunk: Run, sources: tuple[Source, ...], band_: Band) -> list[Block]:
    """The chunk against its keys laid end to end (0-based), trimmed to what the band reaches."""
    keys = Run(0, sum(s.run.size for s in sources), sources[0].run.position)
    return blocks((chunk,), keys, band_)


def fused_forward(provider: Provider, call: AttentionCall, band_: Band, fused, halos_k, halos_v, rows,
                  acc: PartialAttention) -> None:
    for chunk, sources in fused:
        if not sources:
            continue
        k, v = (_laid_end_to_end(x, hx, sources) for x, hx in ((call.key, halos_k), (call.value, halos_v)))
        for block in _fused_blocks(chunk, sources, band_):
            out_b, lse_b = provider.forward(block_call(provider, call, block, k, v, rows))
            acc.add_rows(block.rows, out_b, lse_b)


def fused_backward(provider: Provider, call: AttentionCall, band_: Band, fused, halos_k, halos_v, rows,
                   query_grads, own_dk, own_dv, halo_dk, halo_dv) -> None:
    """Each chunk's one block backward; its dK/dV cut back into the runs they came from (own, or the halo's, to
    travel back to its owner)."""
    for chunk, sources in fused:
        if not sources:
            continue
        k, v = (_laid_end_to_end(x, hx, sources) for x, hx in ((call.key, halos_k), (call.value, halos_v)))
        for block in _fused_blocks(chunk, sources, band_):
            parts = query_grads.block(block_call(provider, call, block, k, v, rows), block.rows,
                                      rows.get("dout", block.rows), rows.get("out", block.rows),
                                      rows.get("lse", block.rows))
            at = 0  # where each source starts in the keys laid end to end
            for s in sources:  # the block's keys are a sub-range of the sources laid end to end
                lo, hi = max(at, block.keys.start), min(at + s.run.size, block.keys.stop)
                if lo < hi:
                    target = slice(s.run.start + lo - at, s.run.start + hi - at)
                    piece = slice(lo - block.keys.start, hi - block.keys.start)
                    dk, dv = (own_dk, own_dv) if s.tensor < 0 else (halo_dk[s.tensor], halo_dv[s.tensor])
                    dk.add(target, parts[0][:, :, piece])
                    dv.add(target, parts[1][:, :, piece])
                at += s.run.size


def _needs_halo(chunk_sources) -> bool:
    return any(source.tensor >= 0 for source in chunk_sources[1])


def halo_forward(provider: Provider, call: AttentionCall, spec, band_: Band,
                 out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """This rank's (out in `out_dtype`, lse float32) under `band_`, and the halos it received (K, V per peer in
    reach, by rank) for the backward. Chunks whose keys are consecutive positions (`fused_plan`) run as one call
    each: those that need no halo while the halos travel, the others once they are here. Otherwise the blocks
    against the rank's own keys run while the halos travel, then those against each halo, merged."""
    me, plan = spec.group.rank, halo_plan(spec.total, spec.group.size, spec.layout, band_)
    k, v = call.key.contiguous(), call.value.contiguous()
    call = call.replace(key=k, value=v)
    sends = {peer: [_gather_runs(k, runs), _gather_runs(v, runs)] for peer, runs in plan.sends(me).items()}
    recvs = {peer: [_buffers(k, runs), _buffers(v, runs)] for peer, runs in plan.receives(me).items()}
    pending = spec.channel().post(sends, recvs, "kv")
    rows = stationary_rows(provider, call, query=call.query)
    acc = PartialAttention(call.batch, call.q_heads, call.q_len, call.value_dim, call.device)
    fused = fused_plan(plan, me, band_) if spec.fuse_halo else None

    def attend(keys: torch.Tensor, values: torch.Tensor, runs: tuple[Run, ...]) -> None:
        for run in runs:
            for block in blocks(plan.queries[me], run, band_):
                out_b, lse_b = provider.forward(block_call(provider, call, block, keys, values, rows))
                acc.add_rows(block.rows, out_b, lse_b)

    if fused is None:
        attend(k, v, plan.queries[me])  # own keys while the halos travel
    else:
        fused_forward(provider, call, band_, [c for c in fused if not _needs_halo(c)], [], [], rows, acc)
    received = tuple(pending.wait())
    got = halos(spec, band_, received)
    if fused is None:
        for _, keys, values, runs in got:
            attend(keys, values, runs)
    else:
        fused_forward(provider, call, band_, [c for c in fused if _needs_halo(c)], [h[1] for h in got],
                      [h[2] for h in got], rows, acc)
    out, lse = acc.result(out_dtype)
    return out, lse, received


def halo_backward(provider: Provider, call: AttentionCall, spec, band_: Band, dout: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, dq_dtype: torch.dtype, received: tuple
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq in `dq_dtype`, dk, dv in the inputs' dtype) of this rank's shard, from the global (out, lse) and the
    forward's halos (see the module docstring). Fused chunks (`fused_plan`) as in the forward: those that need a
    halo first, so that the halos' parts travel back while the others run."""
    me, plan = spec.group.rank, halo_plan(spec.total, spec.group.size, spec.layout, band_)
    own_k, own_v = call.key.contiguous(), call.value.contiguous()
    call = call.replace(key=own_k, value=own_v)
    rows = stationary_rows(provider, call, query=call.query, dout=dout, out=out, lse=lse)
    query_grads = provider.shared_rows_backward(call, dout, out, lse)
    got = halos(spec, band_, received)
    fused = fused_plan(plan, me, band_) if spec.fuse_halo else None
    sums = lambda x: gradsum.DeferredRowSum(x.shape, call.device)  # noqa: E731

    def grads_of(keys: torch.Tensor, values: torch.Tensor, runs: tuple[Run, ...]):
        dk, dv = sums(keys), sums(values)
        for run in runs:
            for block in blocks(plan.queries[me], run, band_):
                kernel_call = block_call(provider, call, block, keys, values, rows)
                parts = query_grads.block(kernel_call, block.rows, rows.get("dout", block.rows),
                                          rows.get("out", block.rows), rows.get("lse", block.rows))
                dk.add(block.keys, parts[0])
                dv.add(block.keys, parts[1])
        return dk, dv

    if fused is None:
        back = {}
        for peer, keys, values, runs in got:  # first: their parts travel back
            dk, dv = grads_of(keys, values, runs)
            back[peer] = [dk.result(call.dtype), dv.result(call.dtype)]
    else:
        own_dk, own_dv = sums(own_k), sums(own_v)
        halo_dk, halo_dv = [sums(h[1]) for h in got], [sums(h[2]) for h in got]
        fused_backward(provider, call, band_, [c for c in fused if _needs_halo(c)], [h[1] for h in got],
                       [h[2] for h in got], rows, query_grads, own_dk, own_dv, halo_dk, halo_dv)
        back = {h[0]: [dk.result(call.dtype), dv.result(call.dtype)] for h, dk, dv in zip(got, halo_dk, halo_dv)}
    incoming = {peer: [_buffers(own_k, runs), _buffers(own_v, runs)] for peer, runs in plan.sends(me).items()}
    pending = spec.channel().post(back, incoming, "dkv")
    if fused is None:
        own_dk, own_dv = grads_of(own_k, own_v, plan.queries[me])  # while the halos' parts travel
    else:
        fused_backward(provider, call, band_, [c for c in fused if not _needs_halo(c)], [], [], rows, query_grads,
                       own_dk, own_dv, [], [])
    parts = iter(pending.wait())
    for runs in plan.sends(me).values():  # what each peer computed on the runs it had from this rank
        dk_in, dv_in = next(parts), next(parts)
        for run, at in zip(runs, packed(runs)):
            own_dk.add(slice(run.start, run.stop), dk_in[:, :, at.start:at.stop])
            own_dv.add(slice(run.start, run.stop), dv_in[:, :, at.start:at.stop])
    return query_grads.dq(dq_dtype), own_dk.result(call.dtype), own_dv.result(call.dtype)
