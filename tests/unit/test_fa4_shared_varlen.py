"""One dQ accumulator over a packed ring rank's rows (fa4_sm90_backward.SharedVarlenAccumulator, and
SharedVarlenRows and shared_sequences of cpattn/packed_varlen.py), on CPU.

FA4's kernels need a Hopper GPU, so `StandInTileLaunches` (a stand-in, named as such) does what the three launches
do to their tensors, in float64 torch, with the library's varlen layout and its whole tiles: sequence i's rows sit
at row (cu_seqlens_q[i] + i * tile) // tile * tile of the row statistics and the accumulator; the preprocess
writes a log-sum-exp of +inf and a dpsum of 0 on a sequence's padding rows; the main kernel reads seqused
lengths where given and computes whole tiles of rows, so rows past a sequence's end in its last tile add what
their statistics give (nothing on padding rows, garbage on another sequence's rows). A packing that does not fit
the frame's tiles therefore gives wrong gradients here, as it would on the GPU. tests/gpu/fa4_direct_check.py
checks the real kernels.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpattn.cp.comm import CommStats
from cpattn.cp.mesh import Group
from cpattn.cp.packed_kernels import ProviderBlocks
from cpattn.cp.packed_layout import CHUNK_TILE
from cpattn.cp.packed_plan import step_plan
from cpattn.cp.packed_ring import PackedRingSpec, packed_ring_backward, packed_ring_forward
from cpattn.packed import packed_layout, packed_view
from cpattn.packed_varlen import SharedVarlenRows, _chain_packing, shared_sequences
from cpattn.providers import get_provider
from cpattn.providers.flash.fa4_sm90_backward import SharedVarlenAccumulator, Sm90BackwardKernels

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "support"))
from loopback_ring import Received  # noqa: E402

LOG2E = 1.0 / math.log(2.0)
TILE = 64


@dataclass(frozen=True)
class TileConfig:
    m_block_size: int = TILE
    dKV_swapAB: bool = False


class StandInTileLaunches(Sm90BackwardKernels):
    """STAND-IN for the three sm90 backward launches (float64 torch on CPU) with the library's varlen layout and
    whole tiles (see the module docstring)."""

    def __init__(self):
        super().__init__(api=None)
        self.main_calls = self.preprocess_calls = self.postprocess_calls = 0

    def tile_config(self, head_dim, head_dim_v, causal):
        return TileConfig()

    @staticmethod
    def _start(cu, i):
        return (cu[i] + i * TILE) // TILE * TILE

    def preprocess(self, config, out, dout, lse, dpsum, lse_log2, accum, cu_seqlens_q=None):
        self.preprocess_calls += 1
        cu = cu_seqlens_q.tolist()
        dpsum.fill_(float("nan"))  # rows outside every sequence's tiles are never read
        lse_log2.fill_(float("nan"))
        accum.zero_()
        for i in range(len(cu) - 1):
            a, b, start = cu[i], cu[i + 1], self._start(cu, i)
            padded = -(-(b - a) // TILE) * TILE
            dpsum[:, start:start + padded] = 0.0
            lse_log2[:, start:start + padded] = float("inf")
            dpsum[:, start:start + b - a] = (out[a:b].double() * dout[a:b].double()).sum(-1).transpose(0, 1)
            lse_log2[:, start:start + b - a] = lse[:, a:b] * LOG2E

    def main(self, config, q, k, v, dout, lse_log2, dpsum, accum, dk, dv, scale, causal, packing=None):
        self.main_calls += 1
        cu_q, cu_k = packing.cu_seqlens_q.tolist(), packing.cu_seqlens_k.tolist()
        used_q = packing.seqused_q.tolist() if packing.seqused_q is not None else [
            b - a for a, b in zip(cu_q, cu_q[1:])]
        used_k = packing.seqused_k.tolist() if packing.seqused_k is not None else [
            b - a for a, b in zip(cu_k, cu_k[1:])]
        tiles = accum.view(q.shape[1], -1, self.head_dim_rounded(config, q.shape[-1]))
        rows_q = torch.cat([q.double(), q.new_zeros((TILE,) + q.shape[1:]).double()])  # reads past the end: 0
        rows_do = torch.cat([dout.double(), dout.new_zeros((TILE,) + dout.shape[1:]).double()])
        for i in range(len(cu_q) - 1):
            nq, nk, a, c, start = used_q[i], used_k[i], cu_q[i], cu_k[i], self._start(cu_q, i)
            if nk == 0:
                continue
            if nq == 0:  # key tiles with no query tile: the kernel writes zeros
                dk[c:c + nk], dv[c:c + nk] = 0, 0
                continue
            whole = -(-nq // TILE) * TILE  # the kernel's whole tiles of rows
            qh, doh = (t[a:a + whole].transpose(0, 1) for t in (rows_q, rows_do))
            kh, vh = (t[c:c + nk].double().transpose(0, 1) for t in (k, v))
            scores = qh @ kh.transpose(-1, -2) * scale
            if causal:  # bottom-right, on the sequence's own rows
                scores = scores.masked_fill(torch.ones(whole, nk, dtype=torch.bool).triu(nk - nq + 1), float("-inf"))
            p = torch.exp2(scores * LOG2E - lse_log2[:, start:start + whole, None].double())
            ds = p * (doh @ vh.transpose(-1, -2) - dpsum[:, start:start + whole, None].double())
            tiles[:, start:start + whole, :q.shape[-1]] += (ds @ kh).float()
            dk[c:c + nk] = (ds.transpose(-1, -2) @ qh * scale).transpose(0, 1)
            dv[c:c + nk] = (p.transpose(-1, -2) @ doh).transpose(0, 1)

    def postprocess(self, config, accum, dq, scale, cu_seqlens_q=None):
        self.postprocess_calls += 1
        cu = cu_seqlens_q.tolist()
        tiles = accum.view(dq.shape[1], -1, self.head_dim_rounded(config, dq.shape[-1]))
        for i in range(len(cu) - 1):
            a, b, start = cu[i], cu[i + 1], self._start(cu, i)
            dq[a:b] = (tiles[:, start:start + b - a, :dq.shape[-1]] * scale).transpose(0, 1)


def _bounds(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


# documents long enough that split ones get early chunks of whole 128-row tiles, and short ones kept whole
ALIGNED = [1400, 37, 900, 260, 1, 700, 2100, 90, 530]


def _rank_tensors(n, h, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(n, h, d, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(), make(), make()


def _chain_reference(dout, q, kb, vb, out, lse, chain, scale):
    """(dq over the chain's rows, dk, dv over its keys) of one chain, from the formulas, float64."""
    rows, keys = slice(chain.q0, chain.q1), slice(chain.k0, chain.k1)
    qc, doc_, oc, lc = q[rows].double(), dout[rows].double(), out[rows].double(), lse[:, rows].double()
    kc, vc = kb[keys].double(), vb[keys].double()
    dq, dk, dv = torch.zeros_like(qc), torch.zeros_like(kc), torch.zeros_like(vc)
    for p in chain.pieces:
        r, c = slice(p.q0, p.q1), slice(p.k0, p.k1)
        qh, kh, vh, doh, oh = (t.transpose(0, 1) for t in (qc[r], kc[c], vc[c], doc_[r], oc[r]))
        s = qh @ kh.transpose(-1, -2) * scale
        if p.causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        prob = torch.exp(s - lc[:, r, None])
        ds = prob * (doh @ vh.transpose(-1, -2) - (oh * doh).sum(-1, keepdim=True))
        dq[r] += (ds @ kh * scale).transpose(0, 1)
        dk[c] += (ds.transpose(-1, -2) @ qh * scale).transpose(0, 1)
        dv[c] += (prob.transpose(-1, -2) @ doh).transpose(0, 1)
    return dq, dk, dv


@pytest.mark.parametrize("world", [2, 3])
def test_every_step_adds_into_one_accumulator(world):
    """Every chain of every step of each rank adds into the rank's accumulator, but those on split documents
    whose chunks are under a tile (early chunks of whole tiles otherwise: packed_layout.CHUNK_TILE): dK/dV per
    chain and the rank's dQ are those of each added chain's own backward (from the formulas), with one
    preprocess and one postprocess per rank."""
    layout = packed_layout(_bounds(ALIGNED), world)
    assert layout.groups  # something is split
    counts = [_check_rank(layout, r, 2, 16, 0.25) for r in range(world)]
    assert sum(c[2] for c in counts)  # late chunks alone against another rank's keys were among them
    assert (sum(c[1] for c in counts) > 0) == (world == 3)  # W = 3 splits documents into chunks under a tile


def _check_rank(layout, r, h, d, scale):
    """Rank `r`'s chains of every step through one accumulator (float32 row statistics, as the library keeps
    them): the added chains' dK/dV and the rank's dQ against the formulas, refusals only on split documents with
    chunks under a tile. Returns (added, refused, late chunks alone that were added)."""
    n = layout.length(r)
    q, dout, out = _rank_tensors(n, h, d, seed=r)
    lse = torch.randn(h, n, dtype=torch.float64).float() + 3.0
    frame = step_plan(layout, r, r, True).chains[0]
    packing = _chain_packing(frame, "cpu")
    kernels = StandInTileLaunches()
    rows = SharedVarlenRows(SharedVarlenAccumulator(kernels, q, dout, out, lse, packing, scale, True), frame,
                            packing)
    want_dq = torch.zeros(n, h, d, dtype=torch.float64)
    added = refused = suffixes = 0
    for s in range(layout.world):
        plan = step_plan(layout, r, s, True)
        if plan is None:
            continue
        kb, vb = (torch.cat([x[a:b] for a, b in plan.kv]) for x in _rank_tensors(layout.length(s), h, d, 100 + s)[:2])
        for c in plan.chains:
            grads = rows.backward(kb[c.k0:c.k1], vb[c.k0:c.k1], c)
            if grads is None:  # only where a split document's chunks are under a tile
                runs = [x for x in layout.runs[r] if x.local < c.q1 and x.local_stop > c.q0]
                assert any(x.region != "whole" and x.size < CHUNK_TILE for x in runs), (r, s, c)
                refused += 1
                continue
            added, suffixes = added + 1, suffixes + (s != r and c.q0 > 0)
            dq_c, dk_c, dv_c = _chain_reference(dout, q, kb, vb, out, lse, c, scale)
            torch.testing.assert_close(grads[0].double(), dk_c, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(grads[1].double(), dv_c, atol=1e-4, rtol=1e-4)
            want_dq[c.q0:c.q1] += dq_c
    torch.testing.assert_close(rows.dq().double(), want_dq, atol=1e-5, rtol=1e-5)  # a float32 accumulator
    assert (kernels.preprocess_calls, kernels.postprocess_calls) == (1, 1)
    return added, refused, suffixes


@settings(max_examples=12, deadline=None)
@given(lengths=st.lists(st.one_of(st.integers(1, 200), st.integers(600, 2400)), min_size=2, max_size=9),
       world=st.integers(2, 4))
def test_drawn_mixes_add_what_fits_and_refuse_the_rest(lengths, world):
    """Hypothesis-drawn mixes of short and long documents over 2 to 4 ranks: whatever chains the accumulator
    takes give each chain's own dK/dV and their dQ sum (the stand-in's whole tiles would corrupt any that do not
    fit); the diagonal step is always taken."""
    layout = packed_layout(_bounds(lengths), world)
    for r in range(world):
        if layout.length(r) and step_plan(layout, r, r, True) is not None:
            added, _, _ = _check_rank(layout, r, 1, 8, 0.3)
            assert added >= 1


def test_rows_off_the_frames_tiles_are_refused():
    """A piece whose rows start off a whole tile of its frame sequence, or end off one before its end, or shares
    its frame sequence with another piece, is refused (None): the kernel's whole tiles would add into other
    rows."""
    from cpattn.cp.packed_plan import Chain, Piece

    frame = Chain(0, 300, 0, 300, True, (Piece(0, 200, 0, 200, True), Piece(200, 300, 200, 300, True)))

    def chain(*pieces):
        q0, k0 = pieces[0][0], 0
        rel = tuple(Piece(a - q0, b - q0, c, e, False) for a, b, c, e in pieces)
        return Chain(q0, pieces[-1][1], k0, pieces[-1][3], False, rel)

    assert shared_sequences(frame, chain((64, 200, 0, 50)), TILE) is not None  # a suffix from a tile
    assert shared_sequences(frame, chain((0, 128, 0, 50)), TILE) is not None  # ends on a tile
    assert shared_sequences(frame, chain((64, 200, 0, 50), (200, 300, 50, 90)), TILE) is not None
    assert shared_sequences(frame, chain((65, 200, 0, 50)), TILE) is None  # starts off a tile
    assert shared_sequences(frame, chain((0, 100, 0, 50)), TILE) is None  # ends mid-tile before the end
    assert shared_sequences(frame, chain((0, 64, 0, 20), (128, 200, 20, 50)), TILE) is None  # one sequence
    cu_q, used_q, cu_k, used_k, gaps = shared_sequences(frame, chain((200, 300, 10, 50)), TILE)
    assert (cu_q, used_q, cu_k, used_k, gaps) == ((0, 200, 300), (0, 100), (0, 10, 50), (0, 40), True)


class _SharedOnNative:
    """The packed ring's kernel for this test: ProviderBlocks on `native` for forward and backward, plus a
    SharedVarlenRows over StandInTileLaunches (or none), to check how the ring uses one."""

    def __init__(self, blocks, shared: bool):
        self._blocks, self._shared = blocks, shared

    def forward(self, q, k, v, chain):
        return self._blocks.forward(q, k, v, chain)

    def backward(self, *args):
        return self._blocks.backward(*args)

    def shared_rows(self, dout, q, out, lse, frame):
        if not self._shared:
            return None
        packing = _chain_packing(frame, "cpu")
        acc = SharedVarlenAccumulator(StandInTileLaunches(), q, dout, out, lse, packing, None, frame.causal)
        return SharedVarlenRows(acc, frame, packing)


class _Loopback:
    def __call__(self, group, timeout, stats):
        return self

    def send_recv(self, send, to_rank, recv, from_rank, kind):
        return Received(recv)


def test_the_ring_adds_the_accumulators_dq_once():
    """packed_ring_backward with the shared accumulator gives each rank the dQ it gives without it (float32, a
    loopback channel: of a lone rank's gradients only dQ is its own)."""
    world, h, d = 3, 2, 16
    layout = packed_layout(_bounds(ALIGNED), world)
    provider = get_provider("native")
    for r in range(world):
        n = layout.length(r)
        q, k, v = _rank_tensors(n, h, d, seed=r, dtype=torch.float32)
        dout = torch.randn(n, h, d)
        shards = {s: _rank_tensors(layout.length(s), h, d, seed=s, dtype=torch.float32)[1:] for s in range(world)}

        def block(consumer, owner):
            plan = step_plan(layout, consumer, owner, True)
            return tuple(torch.cat([x[a:b] for a, b in plan.kv]) for x in shards[owner])

        results = []
        for shared in (False, True):
            blocks = ProviderBlocks(provider, packed_view(q, k, v, True, None), False)
            kernel = _SharedOnNative(blocks, shared)
            spec = PackedRingSpec(Group(None, r, world, "loopback"), layout, True, None, CommStats(),
                                  channel_factory=_Loopback(), block_source=block)
            out, lse, last = packed_ring_forward(kernel, spec, q, k, v)
            results.append(packed_ring_backward(kernel, spec, q, k, v, dout, out, lse, last)[0])
        torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=1e-5)
