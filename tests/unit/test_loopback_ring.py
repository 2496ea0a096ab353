"""LoopbackRing, the stand-in channel that lets one rank's ring steps run alone (the ring split benchmark): at
W = 3 and 4, where the forward and backward directions differ, every rank's out and dQ from the forward and the
reversed backward equal the float64 reference (to the float32 merge's rounding), with and without the forward's
last block handed over."""

from __future__ import annotations

import pytest
import torch

from cpattn.cp.ring import ring_backward, ring_forward_keeping_last
from cpattn.call import make_call
from cpattn.providers.native import NativeMath
from helpers import loopback_spec, reference_with_grads, ring_shards
from loopback_ring import LoopbackRing


@pytest.mark.parametrize("world", (3, 4))
@pytest.mark.parametrize("layout,causal", (("zigzag", True), ("contiguous", True), ("contiguous", False)))
@pytest.mark.parametrize("hand_over", (True, False))
def test_each_rank_alone_matches_the_reference(world, layout, causal, hand_over):
    total = 8 * world
    g = torch.Generator().manual_seed(world)
    q, k, v, dout = (torch.randn(1, 3, total, 8, generator=g, dtype=torch.float64) for _ in range(4))
    want, _, (want_dq, _, _) = reference_with_grads(q, k, v, dout, causal=causal)
    pos, blocks = ring_shards(k, v, world, layout)
    for r in range(world):
        spec = loopback_spec(r, world, layout, total, LoopbackRing(blocks, r))
        call = make_call(q[:, :, pos[r]].contiguous(), *blocks[r], None, 0.0, causal, None, False)
        out, lse, last = ring_forward_keeping_last(NativeMath(), call, spec, torch.float64)
        assert last[0] is blocks[(r + 1) % world][0]  # the forward ends on the block of rank r + 1
        dq, _, _ = ring_backward(NativeMath(), call, spec, dout[:, :, pos[r]], out, lse, torch.float64,
                                 last if hand_over else None)
        torch.testing.assert_close(out, want[:, :, pos[r]], rtol=0, atol=1e-6)  # merges run in float32
        torch.testing.assert_close(dq, want_dq[:, :, pos[r]], rtol=0, atol=1e-6)  # merges run in float32
