"""FA4's sm90 backward kernels launched one by one (cpattn/providers/flash/fa4_sm90_backward.py), on CPU: the
shared dQ accumulator of a ring rank's backward, and one call's backward.

FA4's kernels need a Hopper GPU, so `StandInKernels` (a stand-in, named as such) does what the three launches do
to their tensors, in float64 torch: the preprocess fills dpsum and lse_log2 and clears the accumulator, the main
kernel adds a block's dQ (unscaled) into whole tiles of the accumulator view it is given, and the postprocess
scales the accumulator into dQ. What is tested is cpattn's side: which rows' views each block gets, which blocks
take the per-block path, and how the two sums meet. tests/gpu/gpu_check.py and tests/gpu/fa4_direct_check.py check
the real kernels on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import cpattn
from cpattn.contract import SharedRowsBackward
from cpattn.call import make_call
from cpattn.providers.flash import fa4_sm90_backward
from cpattn.providers.flash.fa4_sm90_backward import (SharedAccumulatorBackward, Sm90BackwardKernels,
                                                      block_rows_fit_tiles)

LOG2E = 1.0 / math.log(2.0)


@dataclass(frozen=True)
class TileConfig:
    m_block_size: int = 4
    dKV_swapAB: bool = False


class StandInKernels:
    """STAND-IN for Sm90BackwardKernels (float64 torch on CPU; tiles of 4 rows): the same tensors in and out."""

    def __init__(self):
        self.main_calls = 0
        self.postprocess_calls = 0

    def tile_config(self, head_dim, head_dim_v, causal):
        return TileConfig()

    head_dim_rounded = staticmethod(Sm90BackwardKernels.head_dim_rounded)

    def preprocess(self, config, out, dout, lse, dpsum, lse_log2, accum):
        s = out.shape[1]
        dpsum.fill_(float("nan"))  # rows past the shared ones must never be read
        lse_log2.fill_(float("nan"))
        dpsum[:, :, :s] = (out.double() * dout.double()).sum(-1).transpose(1, 2)
        lse_log2[:, :, :s] = lse * LOG2E
        accum.zero_()

    def main(self, config, q, k, v, dout, lse_log2, dpsum, accum, dk, dv, scale, causal):
        self.main_calls += 1
        b, sq, h, d = q.shape
        sk = k.shape[1]
        assert lse_log2.shape[-1] == dpsum.shape[-1] == -(-sq // config.m_block_size) * config.m_block_size
        qh, kh, vh, doh = (t.double().transpose(1, 2) for t in (q, k, v, dout))
        scores = qh @ kh.transpose(-1, -2) * scale
        if causal:
            scores = scores.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.exp2(scores * LOG2E - lse_log2[:, :, :sq, None].double())
        ds = p * (doh @ vh.transpose(-1, -2) - dpsum[:, :, :sq, None].double())
        tiles = accum.view(b, h, -1, self.head_dim_rounded(config, d))
        tiles[:, :, :sq, :d] += (ds @ kh).float()
        dk.copy_((ds.transpose(-1, -2) @ qh * scale).transpose(1, 2))
        dv.copy_((p.transpose(-1, -2) @ doh).transpose(1, 2))

    def postprocess(self, config, accum, dq, scale):
        self.postprocess_calls += 1
        b, s, h, d = dq.shape
        dq.copy_((accum.view(b, h, -1, self.head_dim_rounded(config, d))[:, :, :s, :d] * scale).transpose(1, 2))


def _rows_and_blocks(q_len=12, d=32, h=3, seed=0):
    """A rank's rows (q, dout, and the global out and lse over the union of its blocks) and three KV blocks:
    all rows causal against a block as long as the rows, rows 4.. against another, rows 6.. against a third
    (6 is off the stand-in's 4-row tiles)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    q, dout = rand(1, h, q_len, d), rand(1, h, q_len, d)
    blocks = [(slice(0, q_len), rand(1, h, q_len, d), rand(1, h, q_len, d), True),
              (slice(4, q_len), rand(1, h, 8, d), rand(1, h, 8, d), False),
              (slice(6, q_len), rand(1, h, 5, d), rand(1, h, 5, d), False)]
    # the global (out, lse) of each row over the blocks that cover it
    scale = d ** -0.5
    scores = torch.full((1, h, q_len, sum(k.shape[2] for _, k, _, _ in blocks)), float("-inf"), dtype=torch.float64)
    values = torch.cat([v for _, _, v, _ in blocks], dim=2)
    col = 0
    for rows, k, _, causal in blocks:
        s = q[:, :, rows] @ k.transpose(-1, -2) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        scores[:, :, rows, col:col + k.shape[2]] = s
        col += k.shape[2]
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ values
    return q, dout, out, lse, blocks, scale


def _run(session_of, q, dout, out, lse, blocks, scale, dtype=torch.float32):
    cast = lambda t: t.to(dtype)  # noqa: E731
    call = make_call(cast(q), cast(blocks[0][1]), cast(blocks[0][2]), None, 0.0, False, scale, False)
    session = session_of(call, cast(dout), cast(out), lse.float())
    kv_grads = []
    for rows, k, v, causal in blocks:
        block = make_call(cast(q[:, :, rows]), cast(k), cast(v), None, 0.0, causal, scale, False)
        kv_grads.append(session.block(block, rows, cast(dout[:, :, rows]), cast(out[:, :, rows]),
                                      lse[:, :, rows].float()))
    return session.dq(dtype), kv_grads


def test_shared_accumulator_matches_the_per_block_sum():
    provider = cpattn.PROVIDERS["_native_math"]
    q, dout, out, lse, blocks, scale = _rows_and_blocks()
    kernels = StandInKernels()
    dq, kv = _run(lambda c, do, o, l_: SharedAccumulatorBackward(provider, c, do, o, l_, kernels),
                  q, dout, out, lse, blocks, scale)
    dq_ref, kv_ref = _run(lambda c, do, o, l_: SharedRowsBackward(provider, c), q, dout, out, lse, blocks, scale)
    assert kernels.main_calls == 2 and kernels.postprocess_calls == 1  # rows 6.. took the per-block path
    torch.testing.assert_close(dq, dq_ref, atol=1e-5, rtol=1e-5)
    for (dk, dv), (dk_ref, dv_ref) in zip(kv, kv_ref):
        torch.testing.assert_close(dk, dk_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dv, dv_ref, atol=1e-5, rtol=1e-5)
    # and the per-block sum is the float64 gradient of the rows' attention
    qg = q.clone().requires_grad_()
    scores = []
    for rows, k, _, causal in blocks:
        s = torch.full((1, q.shape[1], q.shape[2], k.shape[2]), float("-inf"), dtype=torch.float64)
        part = qg[:, :, rows] @ k.transpose(-1, -2) * scale
        if causal:
            part = part.masked_fill(torch.ones(part.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        s = torch.cat([s[:, :, :rows.start], part], dim=2)
        scores.append(s)
    values = torch.cat([v for _, _, v, _ in blocks], dim=2)
    (torch.softmax(torch.cat(scores, dim=-1), dim=-1) @ values).backward(dout)
    torch.testing.assert_close(dq.double(), qg.grad, atol=1e-4, rtol=1e-4)


def test_only_per_block_rows_leave_the_accumulator_unused():
    provider = cpattn.PROVIDERS["_native_math"]
    q, dout, out, lse, blocks, scale = _rows_and_blocks()
    kernels = StandInKernels()
    dq, _ = _run(lambda c, do, o, l_: SharedAccumulatorBackward(provider, c, do, o, l_, kernels),
                 q, dout, out, lse, blocks[2:], scale)
    dq_ref, _ = _run(lambda c, do, o, l_: SharedRowsBackward(provider, c), q, dout, out, lse, blocks[2:], scale)
    assert kernels.main_calls == 0 and kernels.postprocess_calls == 0
    torch.testing.assert_close(dq, dq_ref)


@pytest.mark.parametrize("rows,q_len,ok", [
    (slice(0, 12), 12, True),    # all rows
    (slice(64, 130), 130, True),  # a later half that runs to the end: its last tile's spare rows are padding
    (slice(0, 64), 130, True),   # ends on a tile boundary
    (slice(0, 70), 130, False),  # ends mid-tile before the last row: its last tile would add into rows 70..127
    (slice(65, 130), 130, False),  # starts off a tile boundary
])
def test_which_rows_share_the_accumulator(rows, q_len, ok):
    assert block_rows_fit_tiles(rows, q_len, 64) is ok


def test_cpu_calls_never_take_the_shared_path():
    provider = cpattn.PROVIDERS["_native_math"]
    q, dout, out, lse, blocks, scale = _rows_and_blocks()
    call = make_call(q.float(), blocks[0][1].float(), blocks[0][2].float(), None, 0.0, False, scale, False)
    assert fa4_sm90_backward.shared_accumulator_backward(provider, StandInKernels(), call, dout, out, lse, 8) is None
    assert fa4_sm90_backward.shared_accumulator_backward(provider, None, call, dout, out, lse, 8) is None


def test_kernels_load_only_for_the_checked_version():
    class Api:  # has every name the launches read
        pass
    for name in fa4_sm90_backward.INTERFACE_NAMES:
        setattr(Api, name, object())
    assert Sm90BackwardKernels.load(Api, "4.0.0b36") is not None
    assert Sm90BackwardKernels.load(Api, "4.0.1") is None
    del Api._bwd_preprocess
    assert Sm90BackwardKernels.load(Api, "4.0.0b36") is None


def test_a_kernel_is_compiled_per_tile_configuration():
    """A causal ring's non-causal blocks run on the causal tile, a non-causal ring's on the library's own: the
    same block shape must not reuse the other's kernel, which would add into the accumulator in the other
    tile's order (wrong dQ, silently)."""
    compiled_for = []

    class Api:  # records which tile each compiled kernel was built for; the launch does nothing
        class FlashAttentionBackwardSm90:
            def __init__(self, *args, tile_m, **kwargs):
                self.tile_m = tile_m

        class cute:
            class runtime:
                make_fake_stream = staticmethod(lambda **kwargs: None)

            @staticmethod
            def compile(kernel, *args, **kwargs):
                compiled_for.append(kernel.tile_m)
                return lambda *call_args: None

        to_cute_tensor = staticmethod(lambda t: t)
        get_broadcast_dims = staticmethod(lambda t: ())
        torch2cute_dtype_map = {torch.bfloat16: "bf16"}
        AuxData = staticmethod(lambda *args: None)

    @dataclass
    class Config:
        m_block_size: int
        n_block_size: int = 128
        num_stages_Q: int = 2
        num_stages_dO: int = 2
        num_stages_PdS: int = 2
        SdP_swapAB: bool = True
        dKV_swapAB: bool = False
        dQ_swapAB: bool = False
        AtomLayoutMSdP: int = 1
        AtomLayoutNdKV: int = 2
        AtomLayoutMdQ: int = 1
        num_wg: int = 2
        dQ_single_wg: bool = False

    kernels = Sm90BackwardKernels(Api)
    q = k = v = dout = torch.zeros(1, 256, 8, 128, dtype=torch.bfloat16)
    stats = torch.zeros(1, 8, 320)
    for config in (Config(64), Config(80, dQ_swapAB=True), Config(64)):
        accum = torch.zeros(1, 8, 320 * 128)
        kernels.main(config, q, k, v, dout, stats, stats, accum, k, v, 0.1, False)
    assert compiled_for == [64, 80]


class StandInCallBackwardKernels(Sm90BackwardKernels):
    """STAND-IN: Sm90BackwardKernels' own `launch_backward`, over StandInKernels' three launches (float64, CPU)."""

    def __init__(self):
        super().__init__(api=None)
        self.launches = StandInKernels()
        self.seen = []  # the tensors `launch_backward` handed the launches

    def tile_config(self, head_dim, head_dim_v, causal):
        return TileConfig()

    def preprocess(self, config, out, dout, lse, dpsum, lse_log2, accum):
        self.seen += [out, dout]
        self.launches.preprocess(config, out, dout, lse, dpsum, lse_log2, accum)

    def main(self, config, q, k, v, dout, lse_log2, dpsum, accum, dk, dv, scale, causal):
        self.seen += [q, k, v]
        self.launches.main(config, q, k, v, dout, lse_log2, dpsum, accum, dk, dv, scale, causal)

    def postprocess(self, config, accum, dq, scale):
        self.launches.postprocess(config, accum, dq, scale)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dout_kind", ["random", "stride 0", "unaligned view"])
def test_launch_backward_is_the_gradient_of_one_call(causal, dout_kind):
    """One call's backward through the three launches, in the (B, S, H, D) views dispatch hands FA4, with the
    kernel-form lse: dQ, dK, dV against float64 autograd. A dO of stride 0 (what `.sum()` hands back) and one on
    an address off 16 bytes are made contiguous first, as the library does (the kernels assume that layout)."""
    g = torch.Generator().manual_seed(3)
    b, h, s, d = 2, 3, 10, 16  # 10 rows: off the stand-in's 4-row tile
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3))
    scores = q @ k.transpose(-1, -2) * d ** -0.5
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    if dout_kind == "random":
        dout = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    elif dout_kind == "stride 0":
        dout = torch.ones((), dtype=torch.float64).expand(b, h, s, d)
    else:
        dout = torch.randn(b * h * s * d + 1, generator=g, dtype=torch.float64)[1:].view(b, h, s, d)
    out.backward(dout)
    kernels = StandInCallBackwardKernels()
    view = lambda t: t.detach().transpose(1, 2)  # noqa: E731
    dq, dk, dv = kernels.launch_backward(view(q), view(k), view(v), view(out), view(dout),
                               scores.logsumexp(-1).detach().float(), None, causal)
    for got, want in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        assert got.shape == (b, s, h, d)
        torch.testing.assert_close(got.transpose(1, 2).double(), want, atol=1e-5, rtol=1e-5)
    assert all(fa4_sm90_backward._aligned_or_copy(t) is t for t in kernels.seen)  # what the launches saw was aligned
    assert kernels.launches.main_calls == 1 and kernels.launches.postprocess_calls == 1


def test_launch_backward_takes_only_sm90_calls_it_runs_as_the_library():
    kernels = StandInCallBackwardKernels()
    q = torch.zeros(1, 8, 4, 64, dtype=torch.bfloat16)
    assert not kernels.can_launch_backward(q, q, q)  # CPU tensors: the library's function runs


@pytest.mark.parametrize("make, copied", [
    (lambda: torch.randn(2, 8, 4, 64, dtype=torch.bfloat16), False),
    (lambda: torch.randn(2, 4, 8, 64, dtype=torch.bfloat16).transpose(1, 2), False),
    (lambda: torch.randn(2, 1, 4, 64, dtype=torch.bfloat16).expand(2, 8, 4, 64), False),  # stride-0 dim kept
    (lambda: torch.ones((), dtype=torch.bfloat16).expand(2, 8, 4, 64), True),  # last dim of stride 0
    (lambda: torch.randn(2, 8, 4, 68, dtype=torch.bfloat16)[..., :64], True),
    (lambda: torch.randn(2 * 8 * 4 * 64 + 1, dtype=torch.bfloat16)[1:].view(2, 8, 4, 64), True),
])
def test_aligned_or_copy_copies_what_the_library_copies(make, copied):
    t = make()
    got = fa4_sm90_backward._aligned_or_copy(t)
    assert (got is not t) is copied
    assert torch.equal(got, t)


class StandInVarlenLaunches(Sm90BackwardKernels):
    """STAND-IN: Sm90BackwardKernels' own `launch_varlen_backward` over varlen launches done in float64 torch on
    CPU, with the library's varlen accumulator layout: sequence i's rows start at row
    (cu_q[i] + i * tile) // tile * tile of dpsum, lse_log2 and the accumulator (tiles of 4 rows here), so buffers
    sized short of that layout fail here as they would corrupt memory on a GPU."""

    def __init__(self):
        super().__init__(api=None)
        self.seen = []  # (launch, cu_seqlens_q it got)

    def tile_config(self, head_dim, head_dim_v, causal):
        return TileConfig()

    @staticmethod
    def _starts(cu_q, tile):
        return [(a + i * tile) // tile * tile for i, a in enumerate(cu_q.tolist()[:-1])]

    def preprocess(self, config, out, dout, lse, dpsum, lse_log2, accum, cu_seqlens_q=None):
        self.seen.append(("preprocess", cu_seqlens_q))
        cu, tile = cu_seqlens_q.tolist(), config.m_block_size
        dpsum.fill_(float("nan"))
        lse_log2.fill_(float("nan"))
        accum.zero_()
        for (a, b), start in zip(zip(cu, cu[1:]), self._starts(cu_seqlens_q, tile)):
            dpsum[:, start:start + b - a] = (out[a:b].double() * dout[a:b].double()).sum(-1).transpose(0, 1)
            lse_log2[:, start:start + b - a] = lse[:, a:b] * LOG2E

    def main(self, config, q, k, v, dout, lse_log2, dpsum, accum, dk, dv, scale, causal, packing=None):
        self.seen.append(("main", packing.cu_seqlens_q))
        cu_q, cu_k = packing.cu_seqlens_q.tolist(), packing.cu_seqlens_k.tolist()
        tiles = accum.view(q.shape[1], -1, self.head_dim_rounded(config, q.shape[-1]))
        for i, start in enumerate(self._starts(packing.cu_seqlens_q, config.m_block_size)):
            (a, b), (c, d) = cu_q[i:i + 2], cu_k[i:i + 2]
            qh, kh, vh, doh = (t.double().transpose(0, 1) for t in (q[a:b], k[c:d], v[c:d], dout[a:b]))
            scores = qh @ kh.transpose(-1, -2) * scale
            if causal:
                scores = scores.masked_fill(torch.ones(b - a, d - c, dtype=torch.bool).triu(d - c - (b - a) + 1),
                                            float("-inf"))
            p = torch.exp2(scores * LOG2E - lse_log2[:, start:start + b - a, None].double())
            ds = p * (doh @ vh.transpose(-1, -2) - dpsum[:, start:start + b - a, None].double())
            assert start + b - a <= tiles.shape[1], "the accumulator is shorter than the library's layout"
            tiles[:, start:start + b - a, :q.shape[-1]] += (ds @ kh).float()
            dk[c:d] = (ds.transpose(-1, -2) @ qh * scale).transpose(0, 1)
            dv[c:d] = (p.transpose(-1, -2) @ doh).transpose(0, 1)

    def postprocess(self, config, accum, dq, scale, cu_seqlens_q=None):
        self.seen.append(("postprocess", cu_seqlens_q))
        cu = cu_seqlens_q.tolist()
        tiles = accum.view(dq.shape[1], -1, self.head_dim_rounded(config, dq.shape[-1]))
        for (a, b), start in zip(zip(cu, cu[1:]), self._starts(cu_seqlens_q, config.m_block_size)):
            dq[a:b] = (tiles[:, start:start + b - a, :dq.shape[-1]] * scale).transpose(0, 1)


@pytest.mark.parametrize("causal", [False, True])
def test_launch_varlen_backward_is_the_gradient_of_each_sequence(causal):
    """A varlen call's backward through the three launches with cu_seqlens (sequences of 5, 1, 7 and 3 rows:
    off the stand-in's 4-row tiles, so each one's rows start on a new tile), against float64 autograd."""
    from cpattn.providers.flash.layout import Packing

    g = torch.Generator().manual_seed(5)
    lengths_q = [5, 1, 7, 3]
    lengths_k = lengths_q if causal else [2, 6, 4, 9]
    cu = lambda lengths: torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)  # noqa
    h, d = 3, 16
    q = torch.randn(sum(lengths_q), h, d, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(sum(lengths_k), h, d, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    outs, lses = [], []
    cu_q, cu_k = cu(lengths_q).tolist(), cu(lengths_k).tolist()
    for i in range(len(lengths_q)):
        qs, ks, vs = (t.transpose(0, 1) for t in (q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]],
                                                  v[cu_k[i]:cu_k[i + 1]]))
        scores = qs @ ks.transpose(-1, -2) * d ** -0.5
        if causal:
            scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
        lses.append(scores.logsumexp(-1))
    out, lse = torch.cat(outs), torch.cat(lses, dim=-1)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(dout)
    packing = Packing(cu(lengths_q), cu(lengths_k), max(lengths_q), max(lengths_k))
    kernels = StandInVarlenLaunches()
    dq, dk, dv = kernels.launch_varlen_backward(q.detach(), k.detach(), v.detach(), out.detach(), dout,
                                                lse.detach().float(), packing, None, causal)
    for got, want in ((dq, q.grad), (dk, k.grad), (dv, v.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert [name for name, _ in kernels.seen] == ["preprocess", "main", "postprocess"]
    assert all(torch.equal(cu_seen, packing.cu_seqlens_q) for _, cu_seen in kernels.seen)


def test_launch_varlen_backward_takes_only_what_it_runs_as_the_library(monkeypatch):
    from cpattn.providers.flash.layout import Packing

    class Api:
        BIN_BATCH_SEARCH_THRESH = 4

    kernels = Sm90BackwardKernels(Api)
    q = torch.zeros(8, 4, 64, dtype=torch.bfloat16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    assert not kernels.can_launch_varlen_backward(q, q, q, Packing(cu, cu, 5, 5))  # CPU tensors
    monkeypatch.setattr(fa4_sm90_backward, "device_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert kernels.can_launch_varlen_backward(q, q, q, Packing(cu, cu, 5, 5))  # the control
    wide = torch.zeros(8, 4, 256, dtype=torch.bfloat16)  # a head dim the varlen GPU check did not cover
    assert not kernels.can_launch_varlen_backward(wide, wide, wide, Packing(cu, cu, 5, 5))
    many = torch.tensor([0, 1, 2, 3, 4, 8], dtype=torch.int32)  # 5 sequences, the limit is 4
    assert not kernels.can_launch_varlen_backward(q, q, q, Packing(many, many, 2, 2))
    assert not kernels.can_launch_varlen_backward(q, q, q, Packing(cu.long(), cu.long(), 5, 5))
    assert not kernels.can_launch_varlen_backward(q, torch.zeros(8, 2, 64, dtype=torch.bfloat16),
                                                  torch.zeros(8, 2, 64, dtype=torch.bfloat16),
                                                  Packing(cu, cu, 5, 5))  # grouped heads: dK/dV accumulators
    assert not Sm90BackwardKernels(object()).can_launch_varlen_backward(q, q, q, Packing(cu, cu, 5, 5))
