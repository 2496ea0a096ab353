"""Attention over packed sequences, with autograd, on one device or under context parallelism.

The packed form of the public API: q, k, v are (total, H, D) tensors holding several sequences (documents) one
after another, their boundaries in int32 cu_seqlens.

* `flash_varlen_attention` runs the `flash_varlen` provider: one varlen kernel call on one device. Under context
  parallelism it takes this rank's shard and the stream's global cu_seqlens; `sharding` says how the stream was
  sharded. "sequence" (the default): by `cpattn.shard_sequence(x, cp_mesh, 0, cp_layout)`, run all-gather
  (cpattn/cp/packed.py). "documents": by `shard_packed`, run the packed ring (cpattn/cp/packed_ring.py) under
  cp_strategy 'auto' or 'ring', or all-gather under 'allgather'.
* `packed_attention` runs the current provider (`attention_provider`) over a stream sharded by documents: the
  packed ring on `flash_varlen`'s varlen kernels, on any other provider its forward/backward per group of
  documents, with a dense document mask where it takes masks. On one device it is the ring's one step.
* Windows, softcaps and sinks apply per document. A window (left, right) counts positions within the document:
  a query at document offset i sees the keys of its own document at offsets i - left .. i + right (right 0
  under is_causal), as attention_dispatch's window does on one sequence. On the varlen kernels every call gets
  its pieces' bands bottom-right aligned, as flash-attn reads window_size per sequence; on other providers a
  band becomes part of the block's mask where the kernel has no window. A softcap goes to every kernel call;
  sinks join once per row, after every block is merged (cpattn/cp/packed_ring.py).
* `shard_packed`, `gather_packed`, `packed_cu_seqlens`, `packed_position_ids` and `packed_layout` give a rank its
  shard of a stream sharded by documents, its inverse, the local boundaries and the positions within each
  document (for RoPE); cpattn/cp/packed_layout.py says how the documents are placed and why.
"""

from __future__ import annotations

from typing import Any

import torch

from .call import checked_sinks, checked_softcap, checked_window
from .contract import AttentionCall, Provider, default_scale
from .cp.comm import all_gather_padded, gather_signatures
from .cp.mesh import topology_from_mesh
from .cp.packed_documents import positions_error, positions_match, run_packed_documents
from .cp.packed_kernels import ProviderBlocks
from .cp.packed_layout import DocumentLayout, document_layout
from .state import current_state
from .errors import InvalidArgumentError, UnsupportedInputError
from .packed_varlen import GatheredVarlen, VarlenBlocks
from .providers import get_provider
from .providers.flash import Packing
from .providers.flash.score_mods import NO_MODS, KernelMods

SHARDINGS = ("sequence", "documents")


def flash_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    sharding: str = "sequence",
    window: "tuple[int | None, int | None] | None" = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over packed sequences on the `flash_varlen` provider, with autograd.

    q: (total_q, Hq, D), k: (total_k, Hkv, D), v: (total_k, Hkv, D), Hq a multiple of Hkv. Sequence i owns
    rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:cu_seqlens_k[i+1] of k and v; cu_seqlens
    are int32, 1-D, start at 0, never decrease and end at total. `is_causal` needs every query sequence as long
    as its key sequence (the causal diagonal is then the same in flash-attn and SDPA). Returns (total_q, Hq, D).
    Under context parallelism q, k, v are this rank's shard, cu_seqlens the whole stream's, and `sharding` how
    the shards were made: "sequence" (`cpattn.shard_sequence`, all-gather) or "documents" (`shard_packed`, the
    packed ring; see the module docstring); a shard made otherwise is caught where its length differs from the
    layout's, and cannot be told apart where it does not. The checks read cu_seqlens on the host (one device sync).

    `window`, `softcap` and `sinks` ((Hq,) logits) apply per sequence as the module docstring says; a window or
    sinks need self-attention sequences (cu_seqlens_q equal to cu_seqlens_k). On one device they run the packed
    ring's one step. Under context parallelism every sharding takes them: all-gather's varlen calls take the
    window per document, and sinks where the library's kernels take them natively (FlashAttention-4); the packed
    ring takes all three on every release. Sinks are a replicated parameter there: each rank's gradient is its
    own rows' share, summed by the usual gradient all-reduce. A softcap runs on every path.

    `position_ids` ((total_q,) integers, optional): the local tokens' positions within their documents, checked
    as `packed_attention` checks them: under sharding="documents" against the document layout, under
    sharding="sequence" against cp_layout's shards, on one device against cu_seqlens_q.
    """
    _check_packed_tensors(q, k, v)
    if sharding not in SHARDINGS:
        raise InvalidArgumentError(f"sharding={sharding!r}; choose one of {SHARDINGS}")
    cp = current_state().cp
    provider = get_provider("flash_varlen")
    view = with_mods(packed_view(q, k, v, is_causal, scale), window, softcap, sinks)
    positions = _checked_positions(position_ids, q)
    if cp is not None and sharding == "documents":
        _check_self_attention(q, k, cu_seqlens_q, cu_seqlens_k)
        bounds = _checked_bounds(cu_seqlens_q, max_seqlen_q, max_seqlen_k, q.device)
        return _documents(cp, provider, view, bounds, positions)
    if cp is not None and cp.world_size > 1:
        return _packed_under_cp(cp, provider, view, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                positions)
    _check_sequences(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal)
    provider.require_available()  # a missing library is ProviderUnavailableError, as for any provider
    if positions is not None and not positions_match(None, cu_seqlens_q.tolist(), positions, q.shape[0]):
        raise positions_error(None)  # (read only where given: cu_seqlens on the GPU cost a sync to read)
    if view.window is not None or view.sinks is not None:  # per document: the packed ring's one step
        _check_documents_for_mods(view, cu_seqlens_q, cu_seqlens_k)
        return _documents(None, provider, view, cu_seqlens_q.tolist())
    reasons = provider.reasons(view)
    if reasons:
        raise UnsupportedInputError("flash_varlen_attention", reasons)
    packing = Packing(cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), int(max_seqlen_q), int(max_seqlen_k))
    return provider.packed_attention(q, k, v, packing, view.scale, view.is_causal, _softcap_mods(view))


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    window: "tuple[int | None, int | None] | None" = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention within each document of a packed stream, on the current provider, with autograd.

    q: (tokens, Hq, D), k and v: (tokens, Hkv, D), Hq a multiple of Hkv; `cu_seqlens`: int32 boundaries of the
    whole stream's documents. Under `attention_provider(p, cp_mesh=mesh)` q, k, v are this rank's shard made by
    `shard_packed` (cp_strategy 'auto' or 'ring': the packed ring; 'allgather' on `flash_varlen` only); on one
    device, the whole stream. Returns (tokens, Hq, Dv). The checks read cu_seqlens on the host: on q's device
    that is one device sync, on the CPU none.

    `window` (left, right), `softcap` and `sinks` ((Hq,) logits) apply per document (see the module docstring):
    a window counts positions within each document; the ring skips the pieces of documents, and the steps, it
    does not reach. A softcap needs a provider that applies one ('flash', 'flash_varlen', 'flex',
    '_native_math'); sinks join once per row, after the merge, with a gradient. Sinks are a parameter replicated
    on every rank: under context parallelism each rank's gradient is its own rows' share, and the usual gradient
    all-reduce over the group sums the shares to the whole gradient. cp_strategy='allgather' takes the window
    and softcap, and sinks where the varlen library's kernels take them natively (else use the ring).

    `position_ids` ((tokens,) integers, optional): the local tokens' positions within their documents as the
    model used them (for RoPE). Where given they must be the layout's (`packed_position_ids`; on one device 0 at
    each document's start): else every rank raises, since a shard made otherwise gives wrong attention even
    where its length is the layout's, and the lengths are all the check has without them.
    """
    _check_packed_tensors(q, k, v)
    state = current_state()
    bounds = _checked_bounds(cu_seqlens, None, None, q.device)
    view = with_mods(packed_view(q, k, v, is_causal, scale), window, softcap, sinks)
    if state.cp is None and bounds[-1] != q.shape[0]:
        raise InvalidArgumentError(f"cu_seqlens end at {bounds[-1]} but q holds {q.shape[0]} tokens")
    return _documents(state.cp, state.provider, view, bounds, _checked_positions(position_ids, q))


def with_mods(view: AttentionCall, window, softcap, sinks) -> AttentionCall:
    """The packed view with its window, softcap and sinks, checked as attention_dispatch checks them."""
    return view.replace(window=checked_window(window), softcap=checked_softcap(softcap),
                        sinks=checked_sinks(sinks, view.query))


def _softcap_mods(view: AttentionCall) -> KernelMods:
    """The varlen kernels' modifications of a call spanning whole sequences: its softcap (a window or sinks
    never get here: they run per document)."""
    return NO_MODS if view.softcap is None else KernelMods(softcap=view.softcap)


def _check_documents_for_mods(view: AttentionCall, cu_seqlens_q, cu_seqlens_k) -> None:
    """A window or sinks on one device run per document of one packed stream: self-attention sequences."""
    if not torch.equal(cu_seqlens_q.cpu(), cu_seqlens_k.cpu()):
        shown = [f"window={view.window}"] if view.window is not None else []
        shown += ["sinks"] if view.sinks is not None else []
        raise UnsupportedInputError("flash_varlen_attention", [
            f"{' and '.join(shown)} with cu_seqlens_q != cu_seqlens_k: windows and sinks apply per document of "
            "one packed stream (self-attention, cu_seqlens_q equal to cu_seqlens_k); for cross-attention with a "
            "window or sinks use cpattn.attention_dispatch per sequence on provider 'flash' or 'native'"])


def _documents(cp, provider: Provider, view: AttentionCall, bounds: list[int],
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """A stream sharded by documents (or whole, without `cp`) through the packed schedules."""
    provider.require_available()
    kernel, gathered, reasons = block_kernel(provider, view)
    return run_packed_documents(cp, provider, view, bounds, kernel, gathered, reasons, position_ids)


def _checked_positions(position_ids: Any, q: torch.Tensor) -> torch.Tensor | None:
    """`position_ids` as given, checked for what it is (its values are checked against the layout later, on
    every rank alike)."""
    if position_ids is None:
        return None
    integral = isinstance(position_ids, torch.Tensor) and not (
        position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool)
    if not integral or position_ids.dim() != 1:
        shown = f"{position_ids.dtype} of shape {tuple(position_ids.shape)}" if isinstance(
            position_ids, torch.Tensor) else type(position_ids).__name__
        raise InvalidArgumentError(f"position_ids must be a 1-D integer tensor (one per local token), got {shown}")
    if position_ids.device != q.device:
        raise InvalidArgumentError(f"position_ids are on {position_ids.device} but q is on {q.device}")
    return position_ids


def block_kernel(provider: Provider, view: AttentionCall):
    """(the packed ring's kernel for `provider`, all-gather's varlen call or None, the provider's reasons to
    refuse `view`): varlen calls on `flash_varlen`, the contract's forward/backward per group of documents on any
    other provider (with dense document masks where it takes boolean masks)."""
    if provider.name == "flash_varlen":
        return VarlenBlocks(provider, view), GatheredVarlen(provider, view), provider.reasons(view)
    caps = provider.capabilities(view.device.type)
    masks = caps is not None and caps.bool_mask
    checked = view.replace(attn_mask=_mask_stand_in(view)) if masks else view
    return ProviderBlocks(provider, view, masks), None, provider.reasons(checked, need_lse=True, need_backward=True)


def _mask_stand_in(call: AttentionCall) -> torch.Tensor:
    """A zero-stride bool mask of the call's shape: what the providers' checks read (its kind, never values)."""
    return torch.zeros((), dtype=torch.bool, device=call.device).expand(1, 1, call.q_len, call.kv_len)


# -- the document sharding's helpers ------------------------------------------------------------------------------


def packed_layout(cu_seqlens: Any, world: int) -> DocumentLayout:
    """Where the documents of the stream `cu_seqlens` go over `world` ranks (cpattn/cp/packed_layout.py): each
    rank's runs, lengths, counted work (`counted_work`, `balance`)."""
    return document_layout(tuple(_bounds_of(cu_seqlens)), int(world))


class _RankShard:
    """Where this rank's shard lies in the document layout: ring rank `rank`'s shard over the mesh's ring
    dimension (a 1-D mesh is all ring), and of it the local range `part` this rank holds (on a 2-D mesh, its
    Ulysses rank's part; else the whole shard)."""

    def __init__(self, cu_seqlens: Any, cp_mesh):
        self.topology = None if cp_mesh is None else topology_from_mesh(cp_mesh)
        ring, parts = (1, 1) if self.topology is None else (self.topology.ring_size, self.topology.ulysses_size)
        self.layout = packed_layout(cu_seqlens, ring)
        self.rank = 0 if self.topology is None else self.topology.ring_rank
        index = 0 if self.topology is None else self.topology.ulysses_rank
        self.part = self.layout.part(self.rank, index, parts)

    def local(self, values: list) -> list:
        """This rank's part of a per-token list of the ring shard."""
        return values[self.part[0]:self.part[1]]

    def cu_seqlens(self) -> list[int]:
        """The ring shard's run boundaries cut to this rank's part, relative to it."""
        a, b = self.part
        inside = [x - a for x in self.layout.local_cu_seqlens(self.rank) if a < x < b]
        return [0] + inside + [b - a]


def shard_packed(x: torch.Tensor, cu_seqlens: Any, cp_mesh, dim: int = 0) -> torch.Tensor:
    """This rank's shard, along `dim`, of a whole packed stream with document boundaries `cu_seqlens`, in the
    document layout that `packed_attention` and `flash_varlen_attention(..., sharding="documents")` take (on a
    2-D mesh, this rank's part of its ring rank's shard)."""
    shard = _RankShard(cu_seqlens, cp_mesh)
    if x.shape[dim] != shard.layout.bounds[-1]:
        raise InvalidArgumentError(f"x has {x.shape[dim]} tokens along dim {dim}, cu_seqlens end at "
                                   f"{shard.layout.bounds[-1]}")
    positions = shard.local(shard.layout.positions(shard.rank))
    return x.index_select(dim, torch.tensor(positions, dtype=torch.long, device=x.device))


@torch.no_grad()
def gather_packed(x_local: torch.Tensor, cu_seqlens: Any, cp_mesh, dim: int = 0,
                  timeout: float = 60.0) -> torch.Tensor:
    """Inverse of `shard_packed`: the whole stream on every rank (not differentiable)."""
    shard = _RankShard(cu_seqlens, cp_mesh)
    topology, layout = shard.topology, shard.layout
    if topology is None:
        return x_local
    dim = dim % x_local.dim()
    if topology.ulysses is not None:  # the parts of this ring rank's shard first
        want = [layout.part(shard.rank, u, topology.ulysses_size) for u in range(topology.ulysses_size)]
        x_local = torch.cat(_gathered_parts(x_local, dim, topology.ulysses, [b - a for a, b in want], timeout),
                            dim=dim)
    if topology.ring is None:
        return x_local
    parts = _gathered_parts(x_local, dim, topology.ring, [layout.length(r) for r in range(layout.world)], timeout)
    return torch.cat(parts, dim=dim).index_select(dim, layout.gather_order().to(x_local.device))


def _gathered_parts(x: torch.Tensor, dim: int, group, want: list[int], timeout: float) -> list[torch.Tensor]:
    """Every rank's `x` over `group`, checked to have the lengths `want` along `dim`."""
    lengths = gather_signatures([x.shape[dim]], group, timeout, x.device)[:, 0].tolist()
    if lengths != want:
        raise InvalidArgumentError(f"local lengths {lengths} are not the document layout's {want} for these "
                                   "cu_seqlens: gather what shard_packed made")
    return all_gather_padded(x, lengths, dim, group, timeout)


def packed_cu_seqlens(cu_seqlens: Any, cp_mesh, device=None) -> torch.Tensor:
    """int32 boundaries of this rank's local runs, each a piece of one document (a document split over the
    ranks gives two, consecutive: its early and its late chunk), for per-document work on the local shard."""
    shard = _RankShard(cu_seqlens, cp_mesh)
    return torch.tensor(shard.cu_seqlens(), dtype=torch.int32, device=_device_of(cu_seqlens, device))


def packed_position_ids(cu_seqlens: Any, cp_mesh, device=None) -> torch.Tensor:
    """Each local token's position within its document (int64), e.g. for RoPE."""
    shard = _RankShard(cu_seqlens, cp_mesh)
    return torch.tensor(shard.local(shard.layout.position_ids(shard.rank)), dtype=torch.long,
                        device=_device_of(cu_seqlens, device))


def _device_of(cu: Any, device):
    return device if device is not None else (cu.device if isinstance(cu, torch.Tensor) else None)


def _bounds_of(cu: Any) -> list[int]:
    bounds = cu.tolist() if isinstance(cu, torch.Tensor) else [int(b) for b in cu]
    if not bounds or bounds[0] != 0 or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise InvalidArgumentError(f"cu_seqlens must start at 0 and never decrease, got {bounds}")
    return bounds


def _checked_bounds(cu: Any, max_q: Any, max_k: Any, device) -> list[int]:
    """The global boundaries of a packed call, checked (and the maximum lengths against them, where given). They
    are read on the host: on q's device or on the CPU, where reading them costs no device sync."""
    if not isinstance(cu, torch.Tensor):
        raise InvalidArgumentError(f"cu_seqlens must be an int32 torch.Tensor, got {type(cu).__name__}")
    on = cu.device if cu.device.type == "cpu" else device
    lengths = _check_cu_seqlens("cu_seqlens", cu, int(cu[-1]) if cu.numel() else 0, "the whole packed stream", on)
    for name, value in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
        if value is not None:
            _check_max_seqlen(name, value, lengths)
    return cu.tolist()


def _check_self_attention(q, k, cu_seqlens_q, cu_seqlens_k) -> None:
    if q.shape[0] != k.shape[0] or not torch.equal(cu_seqlens_q.cpu(), cu_seqlens_k.cpu()):
        raise InvalidArgumentError(
            "under context parallelism flash_varlen_attention is self-attention over one packed stream: q, k and "
            "v are shards of the same tokens and cu_seqlens_q must equal cu_seqlens_k"
        )


def packed_view(q, k, v, is_causal, scale) -> AttentionCall:
    """The call as (1, H, total, D) views of the packed tensors: what the provider's checks and the
    context-parallel front read."""
    return AttentionCall(
        q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), v.unsqueeze(0).transpose(1, 2),
        is_causal=bool(is_causal), scale=default_scale(q.shape[-1]) if scale is None else float(scale),
        enable_gqa=q.shape[1] != k.shape[1],
    )


def _packed_under_cp(cp, provider, view: AttentionCall, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, position_ids=None) -> torch.Tensor:
    """`view`: this rank's shard of one packed stream; cu_seqlens: that stream's global boundaries (see
    cpattn/cp/packed.py for the schedule)."""
    q, k = view.query, view.key
    q, k = q.squeeze(0).transpose(0, 1), k.squeeze(0).transpose(0, 1)
    _check_self_attention(q, k, cu_seqlens_q, cu_seqlens_k)
    lengths = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, int(cu_seqlens_q[-1]), "the whole packed stream",
                                q.device)
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, lengths)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, lengths)
    provider.require_available()

    return cp.run_packed(provider, view, GatheredVarlen(provider, view), cu_seqlens_q.tolist(), position_ids)


def _check_sequences(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, is_causal) -> None:
    """The cu_seqlens and maximum lengths of a single-device call, against q and k and each other."""
    lengths_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q", q.device)
    lengths_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k", q.device)
    if len(lengths_q) != len(lengths_k):
        raise InvalidArgumentError(
            f"cu_seqlens_q describes {len(lengths_q)} sequences but cu_seqlens_k {len(lengths_k)}; they must agree"
        )
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, lengths_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, lengths_k)
    if is_causal and lengths_q != lengths_k:
        raise InvalidArgumentError(
            "is_causal=True needs every query sequence as long as its key sequence (flash-attn aligns the causal "
            f"mask bottom-right, SDPA top-left); got query lengths {lengths_q} and key lengths {lengths_k}"
        )


def _check_packed_tensors(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidArgumentError(f"{name} must be a packed (total, heads, head_dim) tensor, got {shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InvalidArgumentError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InvalidArgumentError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:2] != v.shape[:2]:
        raise InvalidArgumentError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in tokens and heads")
    if q.shape[2] != k.shape[2]:
        raise InvalidArgumentError(f"q head dim {q.shape[2]} != k head dim {k.shape[2]}")
    if q.shape[1] % k.shape[1]:
        raise InvalidArgumentError(f"q heads {q.shape[1]} must be a multiple of k/v heads {k.shape[1]}")


def _check_cu_seqlens(name: str, cu: Any, total: int, owner: str, device: torch.device) -> list[int]:
    """Validate one cu_seqlens tensor; return the sequence lengths."""
    if not isinstance(cu, torch.Tensor):
        raise InvalidArgumentError(f"{name} must be an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise InvalidArgumentError(f"{name} must be int32 (flash-attn reads it as int32), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise InvalidArgumentError(f"{name} must be 1-D with batch + 1 >= 2 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise InvalidArgumentError(f"{name} is on {cu.device} but q is on {device}")
    bounds = cu.tolist()
    if bounds[0] != 0:
        raise InvalidArgumentError(f"{name} must start at 0, got {bounds[0]}")
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    for i, length in enumerate(lengths):
        if length < 0:
            raise InvalidArgumentError(
                f"{name} must be non-decreasing; it drops from {bounds[i]} to {bounds[i + 1]} at index {i + 1}"
            )
    if bounds[-1] != total:
        raise InvalidArgumentError(
            f"{name} must end at the number of packed tokens of {owner} ({total}), got {bounds[-1]}"
        )
    return lengths


def _check_max_seqlen(name: str, value: Any, lengths: list[int]) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"{name} must be an int, got {type(value).__name__}")
    if value < max(lengths):
        raise InvalidArgumentError(f"{name}={value} is smaller than the longest sequence ({max(lengths)})")


__all__ = ["flash_varlen_attention", "gather_packed", "packed_attention", "packed_cu_seqlens", "packed_layout",
           "packed_position_ids", "shard_packed"]
