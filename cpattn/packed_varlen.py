"""The packed schedules' kernels on `flash_varlen` (cpattn/cp/packed_kernels.py's BlockKernel, and all-gather's
varlen call): one varlen call per chain of pieces, its cu_seqlens made once per chain; the calls a chain needs
when its pieces' windows differ (`kernel_calls`); and, where the generation keeps one (FA4's sm90 kernels), one
dQ accumulator over a rank's rows for every backward step (`SharedVarlenRows`, `shared_sequences`)."""

from __future__ import annotations

import bisect
import functools

import torch

from .contract import AttentionCall, Provider, device_capability, normalize_lse, on_device
from .cp.packed_plan import Chain, Piece
from .providers.flash import Packing
from .providers.flash.layout import align_head_dim, deterministic_algorithms
from .providers.flash.score_mods import NO_MODS, KernelMods, band_sides


class VarlenBlocks:
    """The packed ring's kernel on `flash_varlen` (see cpattn/cp/packed_kernels.py): per chain, one varlen
    forward or backward per `kernel_calls` group of its pieces (without a window: the whole chain), on views of
    its rows and keys, with the group's cu_seqlens (pieces and the gaps between them), its window bottom-right
    and the call's softcap."""

    def __init__(self, provider: Provider, view: AttentionCall):
        self._provider, self._view = provider, view

    def _packing(self, chain: Chain, device) -> Packing:
        return _chain_packing(chain, device)

    def _multiple(self, backward: bool) -> int:
        return self._provider.head_dim_multiple(self._view, backward=backward)

    def _mods(self, window) -> KernelMods:
        if window is None and self._view.softcap is None:
            return NO_MODS
        return KernelMods(window=window, softcap=self._view.softcap)

    def forward(self, q, k, v, chain):
        calls = kernel_calls(chain)
        if len(calls) == 1:  # the call's rows and keys are the chain's
            return self._call_forward(q, k, v, *calls[0])
        out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        for call, window in calls:  # rows between the calls see no key: out 0, lse -inf
            rows, keys = slice(call.q0, call.q1), slice(call.k0, call.k1)
            out[rows], lse[:, rows] = self._call_forward(q[rows], k[keys], v[keys], call, window)
        return out, lse

    def _call_forward(self, q, k, v, call: Chain, window):
        gen, multiple = self._provider.generation(), self._multiple(False)
        with torch.no_grad(), on_device(q.device):
            out, lse = gen.varlen_forward(align_head_dim(q, multiple), align_head_dim(k, multiple),
                                          align_head_dim(v, multiple), self._packing(call, q.device),
                                          self._view.scale, call.causal, self._mods(window))
        if lse.dim() == 3:  # releases before varlen LSE went (H, total_q): (sequences, H, longest query)
            cu_q = call.sequences[0]
            lse = torch.cat([lse[i, :, : b - a] for i, (a, b) in enumerate(zip(cu_q, cu_q[1:]))], dim=-1)
        # rows between pieces see no key; where the kernels write -inf for them there is nothing to fix up
        return out[..., : v.shape[-1]], normalize_lse(lse, q.shape[0],
                                                      may_be_empty=gen.empty_row_lse != float("-inf"))

    def backward(self, dout, q, k, v, out, lse, chain):
        calls = kernel_calls(chain)
        if len(calls) == 1:
            return self._call_backward(dout, q, k, v, out, lse, *calls[0])
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for call, window in calls:
            rows, keys = slice(call.q0, call.q1), slice(call.k0, call.k1)
            dq[rows], dk[keys], dv[keys] = self._call_backward(dout[rows], q[rows], k[keys], v[keys], out[rows],
                                                               lse[:, rows], call, window)
        return dq, dk, dv

    def _call_backward(self, dout, q, k, v, out, lse, call: Chain, window):
        gen, multiple = self._provider.generation(), self._multiple(True)
        dtype = q.dtype
        do, qa, ka, va, oa = (align_head_dim(t.to(dtype), multiple) for t in (dout, q, k, v, out))
        with torch.no_grad(), on_device(q.device):
            dq, dk, dv = gen.varlen_backward(do, qa, ka, va, oa, _kernel_lse(lse),
                                             self._packing(call, q.device), self._view.scale, call.causal,
                                             deterministic_algorithms(), self._mods(window))
        return dq[..., : q.shape[-1]], dk[..., : k.shape[-1]], dv[..., : v.shape[-1]]

    def shared_rows(self, dout, q, out, lse, frame: Chain) -> "SharedVarlenRows | None":
        """The backward's steps adding into one dQ accumulator over this rank's rows, `frame` the diagonal step's
        chain over every row (BlockKernel.shared_rows), where the generation keeps one
        (`Generation.shared_varlen_backward`) and the call has plain scores, Hq == Hkv and unpadded head dims."""
        view, multiple = self._view, self._multiple(True)
        calls = kernel_calls(frame)
        if (frame.q0 != 0 or frame.q1 != q.shape[0] or len(calls) != 1 or calls[0][1] is not None
                or view.softcap is not None or view.q_heads != view.kv_heads or q.shape[-1] % multiple
                or out.shape[-1] != q.shape[-1]):
            return None
        gen, packing = self._provider.generation(), self._packing(frame, q.device)
        with torch.no_grad(), on_device(q.device):
            acc = gen.shared_varlen_backward(dout.to(q.dtype), q, out.to(q.dtype), _kernel_lse(lse), packing,
                                             view.scale, frame.causal)
        return None if acc is None else SharedVarlenRows(acc, frame, packing)


class SharedVarlenRows:
    """A packed ring rank's backward steps on one dQ accumulator (a SharedVarlenAccumulator over the diagonal
    step's chain, the frame): each chain whose rows fit the frame's sequences in whole tiles (`shared_sequences`)
    adds into it; the others return None and run their own backward."""

    def __init__(self, acc, frame: Chain, frame_packing: Packing):
        self._acc, self._frame, self._frame_packing = acc, frame, frame_packing
        self.added = False

    def backward(self, k, v, chain: Chain) -> "tuple[torch.Tensor, torch.Tensor] | None":
        """(dk, dv) of `chain` against its keys `k`, `v` (the chain's), its dQ added into the accumulator; None
        where its rows do not fit the frame's sequences, or it runs as more than one call or with a window."""
        calls = kernel_calls(chain)
        if len(calls) != 1 or calls[0][1] is not None:
            return None
        if chain is self._frame:
            packing, gaps = self._frame_packing, False
        else:
            sequences = shared_sequences(self._frame, chain, self._acc.tile)
            if sequences is None:
                return None
            packing, gaps = _shared_packing(sequences, k.device), sequences[-1]
        with torch.no_grad(), on_device(k.device):
            dk, dv = self._acc.add(k, v, packing, calls[0][0].causal, gaps)
        self.added = True
        return dk, dv

    def dq(self) -> torch.Tensor:
        """dQ of every row of the rank, (rows, Hq, D), from every chain that was added."""
        with torch.no_grad(), on_device(self._frame_packing.cu_seqlens_q.device):
            return self._acc.dq()


@functools.lru_cache(maxsize=4096)
def shared_sequences(frame: Chain, chain: Chain, tile: int):
    """(cu_q, used_q, cu_k, used_k, keys in gaps) of `chain` as a call on the rank's rows with `frame`'s sequence
    count (fa4_sm90_backward.SharedVarlenAccumulator): each piece is the sequence of the frame sequence holding
    its rows, by a start and a length (seqused), its keys likewise in the chain's key view; the other sequences
    are empty. None where a piece's rows start off a whole tile of their frame sequence, end off one before its
    end, or share a frame sequence with another piece. `keys in gaps`: keys of the view no piece reads."""
    starts = frame.sequences[0]  # frame.q0 == 0: rows of the rank
    n = len(starts) - 1
    cu_q, used_q, cu_k, used_k = list(starts[:-1]), [0] * n, [0] * n, [0] * n
    last, key = -1, 0
    for p in chain.pieces:
        a, b = chain.q0 + p.q0, chain.q0 + p.q1
        i = bisect.bisect_right(starts, a) - 1
        if i <= last or i >= n:
            return None
        s, e = starts[i], starts[i + 1]
        if b > e or (a - s) % tile or (b != e and (b - s) % tile):
            return None
        cu_k[last + 1:i] = [key] * (i - last - 1)  # empty sequences between: keys stay increasing
        cu_q[i], used_q[i], cu_k[i], used_k[i] = a, b - a, p.k0, p.k1 - p.k0
        last, key = i, p.k1
    cu_k[last + 1:] = [key] * (n - last - 1)
    gaps = sum(used_k) != chain.k1 - chain.k0
    return (tuple(cu_q) + (starts[-1],), tuple(used_q), tuple(cu_k) + (key,), tuple(used_k), gaps)


@functools.lru_cache(maxsize=4096)
def _shared_packing(sequences, device) -> Packing:
    """`shared_sequences` on `device`, made once (as `_chain_packing`)."""
    cu_q, used_q, cu_k, used_k, _ = sequences
    made = [_int32_on(x, device) for x in (cu_q, cu_k, used_q, used_k)]
    return Packing(made[0], made[1], max(used_q), max(used_k), seqused_q=made[2], seqused_k=made[3])


class GatheredVarlen:
    """All-gather's varlen call on `flash_varlen` (cpattn/cp/packed.py's GatheredKernel): one library call with
    its autograd, the call's window per sequence (bottom-right, as cp/packed.run_calls gives it), its softcap,
    and its sinks where the generation takes them natively (with their gradient)."""

    def __init__(self, provider: Provider, view: AttentionCall):
        self._provider, self._view = provider, view

    def takes_sinks(self) -> bool:
        view = self._view
        capability = device_capability(view.device) if view.device.type == "cuda" else None
        return self._provider.generation().native_sinks(view, capability)

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, window):
        view = self._view
        sinks = None if view.sinks is None else view.sinks.float().contiguous()  # keeps its graph
        mods = NO_MODS
        if window is not None or view.softcap is not None or sinks is not None:
            mods = KernelMods(window=window, softcap=view.softcap, sinks=sinks)
        return self._provider.packed_attention(q, k, v, Packing(cu_q, cu_k, max_q, max_k), view.scale, causal, mods)


def _kernel_lse(lse: torch.Tensor) -> torch.Tensor:
    """The chain rows' global log-sum-exp as the backward kernel takes it, with no +inf fix-up
    (contract.lse_for_kernel_backward): a row whose global lse is -inf sees no key in any chain (a row that sees
    one has a finite lse for it, and the global lse is at least that), so the kernel computes no score on it."""
    return lse.float().contiguous()


# -- one varlen call per group of a chain's pieces that share a window ------------------------------------------

Side = "tuple[int | None, int]"  # (bottom-right side or None unbounded, the least int that stands for None)


def _piece_sides(p: Piece) -> "tuple[Side, Side]":
    """A piece's band as the kernels' bottom-right (left, right) sides, each with the least bound that is the same
    as unbounded on this piece: a left side of keys - 1 lets the last row reach key 0, a right side of rows - 1
    lets the first row reach the last key."""
    rows, keys = p.q1 - p.q0, p.k1 - p.k0
    if p.window is not None:
        left, right = band_sides(p.window, rows, keys)  # >= 0: trim_block cut the piece to its band
    else:
        left, right = None, (0 if p.causal else None)
    return (left, keys - 1), (right, rows - 1)


def _join_side(a: Side, b: Side) -> "Side | None":
    """One side both pieces can take, or None: equal bounds, or a bound that covers the unbounded one's piece."""
    (va, na), (vb, nb) = a, b
    if va is None and vb is None:
        return None, max(na, nb)
    if va is not None and vb is not None:
        return a if va == vb else None
    value, need = (va, nb) if va is not None else (vb, na)
    return (value, 0) if value >= need else None


@functools.lru_cache(maxsize=4096)
def kernel_calls(chain: Chain) -> "tuple[tuple[Chain, tuple | None], ...]":
    """The chain as varlen calls: consecutive pieces whose bands one window_size holds (bottom-right, as the
    kernels align it per sequence) share a call. Each call is (a chain relative to this chain's starts, whose
    causal flag the call takes, the window or None). A chain without windows is one call; with a window, whole
    documents shorter than it join the longer ones' call (their band is then the same as unbounded)."""
    groups: list[list] = []  # [pieces, left side, right side]
    for p in chain.pieces:
        left, right = _piece_sides(p)
        if groups:
            joined = _join_side(groups[-1][1], left), _join_side(groups[-1][2], right)
            if None not in joined:
                groups[-1][0].append(p)
                groups[-1][1:] = joined
                continue
        groups.append([[p], left, right])
    return tuple(_call_of(members, left[0], right[0]) for members, left, right in groups)


def _call_of(members: list[Piece], left, right) -> "tuple[Chain, tuple | None]":
    causal = left is None and right == 0  # the kernels' causal mask is this band
    window = None if causal or (left is None and right is None) else (left, right)
    q0, k0 = members[0].q0, members[0].k0
    pieces = tuple(p.moved(q0, k0) for p in members)
    return Chain(q0, members[-1].q1, k0, members[-1].k1, causal, pieces), window


@functools.lru_cache(maxsize=4096)
def _chain_packing(chain: Chain, device) -> Packing:
    """A chain's cu_seqlens on `device`, made once: step plans are cached per stream, so every call over the same
    documents (every layer, every step of training) finds its packings here. On CUDA they are copied from pinned
    memory without waiting: a blocking copy would wait for the GPU to drain in the middle of a ring step."""
    cu_q, cu_k = chain.sequences
    longest = lambda cu: max(b - a for a, b in zip(cu, cu[1:]))  # noqa: E731
    return Packing(_int32_on(cu_q, device), _int32_on(cu_k, device), longest(cu_q), longest(cu_k))


def _int32_on(values, device) -> torch.Tensor:
    """int32 `values` on `device`; on CUDA copied from pinned memory without waiting."""
    host = torch.tensor(values, dtype=torch.int32)
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
