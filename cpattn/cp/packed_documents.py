"""Packed streams sharded by documents (cp/packed_layout.py): the checks, the agreement, and the schedule.

Order of events, the same on every rank: every local reason to refuse is collected; one small all-gather
compares an integer signature of the call (provider, schedule, dtype, heads, dims, causal, scale, gradients,
window, softcap, sinks, the document boundaries' checksum, whether the rank refused, its local length, whether
its position ids, where given, are the layout's); any difference or refusal raises the same error everywhere
before data moves; each rank's local length must be what the document layout gives it. Position ids catch a
shard made otherwise whose length happens to be the layout's: the lengths alone cannot tell it apart. Then
cp_strategy picks the schedule: 'ring' or 'auto' the packed ring (cp/packed_ring.py), 'allgather' the gathered
varlen calls of cp/packed.py over the same shards (varlen kernels only). With no group (one device)
the packed ring runs its one step. On a 2-D mesh the hybrid schedule: Ulysses over the mesh's Ulysses
dimension (cp/ulysses.py) around the packed ring over its ring dimension (`_hybrid`); the signatures are
compared along both dimensions.

Windows, softcaps and sinks run per document on the packed ring (cp/packed_ring.py: windows cut its pieces, a
softcap goes to every kernel call, sinks join once in the final merge). All-gather over document shards runs
cp/packed.py's varlen calls, which take windows and softcaps per document, and sinks where the kernel takes them
natively; where it does not, sinks are refused, naming the ring, rather than dropped.
"""

from __future__ import annotations

import functools
import struct
import zlib

import torch

from ..contract import AttentionCall, Provider
from ..errors import InvalidArgumentError, RankMismatchError, UnsupportedInputError
from .agreement import gather_names, provider_code
from .comm import CommStats, all_gather_padded, all_reduce_sum, gather_signatures
from .packed import GatheredKernel, check_bounds, gathered_mod_reasons, gathered_runs
from .packed_kernels import BlockKernel
from .packed_layout import DocumentLayout, document_layout
from .packed_ring import PackedRingSpec, packed_ring_attention
from .schedule import Setup
from .ulysses import UlyssesSpec, heads_reasons, ulysses_attention

SCHEDULES = ("ring", "allgather")  # what packed documents run, by cp_strategy ('auto' is the ring)
_DTYPES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
FIELDS = ("provider", "schedule", "dtype", "query heads", "key/value heads", "head dim", "value head dim",
          "is_causal", "scale", "requires grad", "window left", "window right", "softcap", "sinks",
          "number of cu_seqlens entries", "cu_seqlens (checksum)")
_REFUSED, _LENGTH, _POSITIONS = len(FIELDS), len(FIELDS) + 1, len(FIELDS) + 2
SHARD_HINT = ("shard q, k and v with cpattn.packed.shard_packed(x, cu_seqlens, cp_mesh) and pass the global "
              "cu_seqlens")
POSITIONS_HINT = ("the position ids of such a shard are cpattn.packed.packed_position_ids(cu_seqlens, cp_mesh) "
                  "(shard_packed of the stream's per-document positions)")


def schedule_of(cp: Setup | None) -> str:
    return "allgather" if cp is not None and cp.strategy == "allgather" else "ring"


def document_reasons(cp: Setup | None, call: AttentionCall, gathered: GatheredKernel | None) -> list[str]:
    """Why packed documents cannot run `call` with `cp` (whatever the provider)."""
    out = []
    if schedule_of(cp) == "allgather" and gathered is not None:
        out = gathered_mod_reasons(call, gathered, "cp_strategy='ring' or 'auto'")
    if cp is None:
        return out
    if cp.topology.mesh_dims == 2:  # the hybrid schedule (attention_provider takes no other strategy here)
        return out + heads_reasons(call, cp.topology.ulysses_size)
    if cp.strategy not in ("auto",) + SCHEDULES:
        out.append(f"packed documents run cp_strategy='ring' (or 'auto') or 'allgather', not '{cp.strategy}'")
    if cp.strategy == "allgather" and gathered is None:
        out.append("cp_strategy='allgather' over document shards runs on varlen kernels only (a provider with "
                   "packed sequences); pass cp_strategy='ring' or 'auto'")
    if cp.replicated:
        out.append("cp_replicated_prefix and cp_replicated_suffix have no packed form: put the shared tokens in a "
                   "document of their own")
    return out


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _window_sides(window) -> list[int]:
    """A window's sides as integers: -1 an unbounded side, -2 no window at all."""
    if window is None:
        return [-2, -2]
    return [-1 if side is None else int(side) for side in window]


def _signature(cp: Setup, provider: Provider, call: AttentionCall, bounds: list[int], refused: bool,
               positions_ok: bool) -> list[int]:
    digest = zlib.crc32(struct.pack(f"<{len(bounds)}q", *bounds))
    softcap = 0 if call.softcap is None else _float_bits(call.softcap)
    return [provider_code(provider), SCHEDULES.index(schedule_of(cp)), _DTYPES.get(call.dtype, 0), call.q_heads,
            call.kv_heads, call.head_dim, call.value_dim, int(call.is_causal), _float_bits(call.scale),
            int(call.needs_grad), *_window_sides(call.window), softcap, int(call.sinks is not None),
            len(bounds), digest, int(refused), call.q_len, int(positions_ok)]


def positions_match(cp: Setup | None, bounds: list[int], position_ids: torch.Tensor | None, q_len: int) -> bool:
    """Whether `position_ids` (this rank's tokens' positions within their documents, as the model used them) are
    what the document layout of `bounds` gives this rank's part; True where none are given, and where the local
    length is not the layout's (the length check then says so, more plainly)."""
    if position_ids is None:
        return True
    t = None if cp is None else cp.topology
    where = (0, 0, 1) if t is None else (t.ring_rank, t.ulysses_rank, t.ulysses_size)
    expected = _layout_positions(tuple(bounds), 1 if t is None else t.ring_size, *where, position_ids.device)
    if expected.numel() != q_len:
        return True
    return position_ids.numel() == q_len and bool(torch.equal(position_ids.reshape(-1).long(), expected))


@functools.lru_cache(maxsize=16)
def _layout_positions(bounds: tuple[int, ...], world: int, rank: int, index: int, parts: int,
                      device: torch.device) -> torch.Tensor:
    """Per-document positions of the `index`-th of `parts` parts of `rank`'s shard, on `device` (made once per
    stream: every layer of a model checks the same ones)."""
    layout = document_layout(bounds, world)
    a, b = layout.part(rank, index, parts)
    return torch.tensor(layout.position_ids(rank)[a:b], dtype=torch.long, device=device)


def positions_error(wrong: list[int] | None, dim: str | None = None) -> InvalidArgumentError:
    """The error for position ids that are not the layout's: of the ranks `wrong`, or on one device (None)."""
    if wrong is None:
        return InvalidArgumentError(
            "position_ids are not each token's position within its document of these cu_seqlens (0 at every "
            "document's start, then one more per token): the documents the model's positions describe are not "
            "those the attention runs over (cpattn.packed.packed_position_ids(cu_seqlens, None) gives them)")
    where = "" if dim is None else f" (along the mesh's {dim} dimension)"
    return InvalidArgumentError(
        f"position_ids of rank(s) {wrong}{where} are not their tokens' positions within their documents in the "
        "document layout of these cu_seqlens: the local tokens were sharded otherwise (another layout, or another "
        f"order), and attention over them would be wrong even where their lengths match. {SHARD_HINT}; "
        f"{POSITIONS_HINT}")


def agree_documents_call(cp: Setup, provider: Provider, call: AttentionCall, bounds: list[int],
                         refused: bool, positions_ok: bool = True) -> dict[str, list[int]]:
    """Every rank makes the same packed call (else the same error on every rank); returns, per dimension of the
    mesh ("ring", and "ulysses" on a 2-D mesh), the local lengths of the ranks of this rank's group along it.

    On a 2-D mesh the signatures are compared along the ring dimension, then along the Ulysses dimension with
    each rank's verdict on its ring group: a rank outside both groups of a rank that disagrees still shares a
    Ulysses group with a rank of that rank's ring group, so it learns of the problem there, and every rank raises
    before any data moves."""
    lengths, problem = {}, None
    for dim, group in (("ring", cp.topology.ring), ("ulysses", cp.topology.ulysses)):
        if group is None:
            continue
        signature = _signature(cp, provider, call, bounds, refused, positions_ok) + [int(problem is not None)]
        table = gather_signatures(signature, group, cp.timeout, call.device)
        if problem is None:
            problem = _disagreement(table, provider, call, group, cp, refused)
        wrong = [r for r, ok in enumerate(table[:, _POSITIONS].tolist()) if not ok]
        if problem is None and wrong:
            problem = positions_error(wrong, dim)
        if problem is None and any(table[:, -1].tolist()):
            problem = RankMismatchError(
                "another rank of the context-parallel mesh cannot run this packed call (its ring group disagrees "
                "or refused it); the error on that rank says why")
        lengths[dim] = table[:, _LENGTH].tolist()
    if problem is not None:
        raise problem
    return lengths


def _disagreement(table: torch.Tensor, provider: Provider, call: AttentionCall, group, cp: Setup,
                  refused: bool) -> Exception | None:
    """The error every rank of `group` raises for `table` (their signatures), or None."""
    for i, name in enumerate(FIELDS):
        column = table[:, i].tolist()
        if len(set(column)) > 1:
            shown = gather_names(provider.name, group, cp.timeout, call.device) if name == "provider" else column
            return RankMismatchError(
                f"ranks of the context-parallel group disagree on {name} of a packed call: "
                + ", ".join(f"rank {r}: {x}" for r, x in enumerate(shown))
                + ". Every rank must make the same call on its shard, with the global cu_seqlens of the stream.")
    refused_ranks = [r for r, x in enumerate(table[:, _REFUSED].tolist()) if x]
    if refused_ranks and not refused:
        return UnsupportedInputError(f"packed documents on provider '{provider.name}'",
                                     [f"rank(s) {refused_ranks} refused this call; their error lists the reasons"])
    return None


def check_lengths(layout: DocumentLayout, lengths: dict[str, list[int]], topology) -> None:
    """Each rank's local length is its part of the document layout (lengths from `agree_documents_call`)."""
    parts = 1 if topology is None else topology.ulysses_size
    ring_rank = 0 if topology is None else topology.ring_rank
    part = 0 if topology is None else topology.ulysses_rank
    def size(rank: int, index: int) -> int:
        a, b = layout.part(rank, index, parts)
        return b - a

    want = {"ring": [size(r, part) for r in range(layout.world)],
            "ulysses": [size(ring_rank, u) for u in range(parts)]}
    for dim, have in lengths.items():
        if have != want[dim]:
            whole = [layout.length(r) for r in range(layout.world)]
            raise RankMismatchError(
                f"local packed lengths {have} (along the mesh's {dim} dimension) do not match the document layout "
                f"of these cu_seqlens over {layout.world} ranks, which gives {want[dim]} (shards {whole}"
                + (f", each in {parts} parts" if parts > 1 else "") + f"): {SHARD_HINT}")


def _shd(x: torch.Tensor) -> torch.Tensor:
    return x.squeeze(0).transpose(0, 1)


def run_packed_documents(cp: Setup | None, provider: Provider, call: AttentionCall, bounds: list[int],
                         kernel: BlockKernel, gathered: GatheredKernel | None, reasons: list[str],
                         position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's packed output. `call` holds (1, H, S_local, D) views of the packed local q, k, v; `reasons`
    the provider's refusals; `kernel` runs the ring's chains, `gathered` (or None) all-gather's varlen calls;
    `position_ids` (or None) the local tokens' positions within their documents, checked against the layout."""
    reasons = reasons + document_reasons(cp, call, gathered)
    world = 1 if cp is None else cp.topology.ring_size
    positions_ok = positions_match(cp, bounds, position_ids, call.q_len)
    lengths = {"ring": [call.q_len]}
    if cp is not None:
        lengths = agree_documents_call(cp, provider, call, bounds, refused=bool(reasons), positions_ok=positions_ok)
    elif not positions_ok:
        raise positions_error(None)
    if reasons:
        raise UnsupportedInputError(f"packed documents on provider '{provider.name}'", reasons)
    layout = document_layout(tuple(bounds), world)
    if "ulysses" not in lengths:  # on a 2-D mesh the lengths along each dimension do not add up to the stream
        check_bounds(bounds, sum(lengths["ring"]))
    check_lengths(layout, lengths, None if cp is None else cp.topology)
    stats = cp.stats if cp is not None else CommStats()
    stats["calls"] += 1
    if schedule_of(cp) == "allgather":
        return _gathered(gathered, cp, layout, call, bounds)
    spec = PackedRingSpec(cp.topology.ring if cp is not None else None, layout, call.is_causal,
                          cp.data_timeout if cp is not None else None, stats, window=call.window)
    if cp is not None and cp.topology.mesh_dims == 2:
        return _hybrid(kernel, spec, cp, call, lengths["ulysses"])
    return packed_ring_attention(kernel, spec, _shd(call.query), _shd(call.key), _shd(call.value), call.sinks)


def _hybrid(kernel: BlockKernel, ring: PackedRingSpec, cp: Setup, call: AttentionCall,
            lengths: list[int]) -> torch.Tensor:
    """The hybrid schedule over document shards: Ulysses' all-to-all over the mesh's Ulysses dimension turns this
    rank's part of its ring rank's shard, all heads, into the whole shard for a slice of the heads (the parts
    concatenate to it, DocumentLayout.part), and the packed ring over the ring dimension attends those heads
    (their sinks with them); the all-to-all back returns this rank's part with every head."""
    def inner(heads: AttentionCall) -> torch.Tensor:
        out = packed_ring_attention(kernel, ring, _shd(heads.query), _shd(heads.key), _shd(heads.value),
                                    heads.sinks)
        return out.transpose(0, 1).unsqueeze(0)

    spec = UlyssesSpec(cp.topology.ulysses, lengths, cp.data_timeout, cp.stats)
    return _shd(ulysses_attention(call, spec, inner))


class _GatherDocuments(torch.autograd.Function):
    """All-gather of packed document shards (tokens first) into global order; backward sums each rank's part
    over ranks and keeps this rank's."""

    @staticmethod
    def forward(ctx, x, cp: Setup, layout: DocumentLayout):
        group = cp.topology.ring
        ctx.cp, ctx.layout = cp, layout
        cp.stats["all_gather"] += 1
        parts = all_gather_padded(x.contiguous(), _lengths(layout), 0, group, cp.data_timeout)
        return torch.cat(parts, dim=0).index_select(0, layout.gather_order().to(x.device))

    @staticmethod
    def backward(ctx, grad):
        cp, layout = ctx.cp, ctx.layout
        group = cp.topology.ring
        cp.stats["reduce_scatter"] += 1
        positions = torch.tensor([p for r in range(layout.world) for p in layout.positions(r)], dtype=torch.long,
                                 device=grad.device)
        total = all_reduce_sum(grad.index_select(0, positions).contiguous(), group, cp.data_timeout)
        lengths = _lengths(layout)
        return total.narrow(0, sum(lengths[: group.rank]), lengths[group.rank]), None, None


def _lengths(layout: DocumentLayout) -> list[int]:
    return [layout.length(r) for r in range(layout.world)]


def _gathered(kernel: GatheredKernel, cp: Setup, layout: DocumentLayout, call: AttentionCall,
              bounds: list[int]) -> torch.Tensor:
    """cp/packed.py's varlen calls per run of local queries, against K/V gathered from the document shards."""
    keys, values = (_GatherDocuments.apply(_shd(x), cp, layout).contiguous() for x in (call.key, call.value))
    return gathered_runs(kernel, call, bounds, layout.positions(cp.topology.ring.rank), keys, values)
