"""LoopbackRing, the stand-in channel that lets one rank's ring steps run alone (the ring split benchmark): at
W = 3 and 4, where the forward and backward directions differ, every rank's out and dQ from the forward and the
reversed backward equal the float64 reference (to the float32 merge's rounding), with and without the forward's
last block handed over."""

from __future__ import annotations

import pytest
import torch

from cpattn import reference_attention
from cpattn.cp.comm import CommStats, LoopbackRing
from cpattn.cp.layout import ring_positions
from cpattn.cp.mesh import Group
from cpattn.cp.ring import RingSpec, ring_backward, ring_forward_keeping_last
from cpattn.dispatch import make_call
from cpattn.providers.native import NativeMath


@pytest.mark.parametrize("world", (3, 4))
@pytest.mark.parametrize("layout,causal", (("zigzag", True), ("contiguous", True), ("contiguous", False)))
@pytest.mark.parametrize("hand_over", (True, False))
def test_each_rank_alone_matches_the_reference(world, layout, causal, hand_over):
    total = 8 * world
    g = torch.Generator().manual_seed(world)
    q, k, v, dout = (torch.randn(1, 3, total, 8, generator=g, dtype=torch.float64) for _ in range(4))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    want, _ = reference_attention(*ref, is_causal=causal)
    want.backward(dout)
    pos = [ring_positions(total, world, r, layout) for r in range(world)]
    blocks = [(k[:, :, p].contiguous(), v[:, :, p].contiguous()) for p in pos]
    for r in range(world):
        spec = RingSpec(Group(None, r, world, "loopback"), layout, total, 60.0, CommStats(),
                        channel_factory=LoopbackRing(blocks, r))
        call = make_call(q[:, :, pos[r]].contiguous(), *blocks[r], None, 0.0, causal, None, False)
        out, lse, last = ring_forward_keeping_last(NativeMath(), call, spec, torch.float64)
        assert last[0] is blocks[(r + 1) % world][0]  # the forward ends on the block of rank r + 1
        dq, _, _ = ring_backward(NativeMath(), call, spec, dout[:, :, pos[r]], out, lse, torch.float64,
                                 last if hand_over else None)
        torch.testing.assert_close(out, want.detach()[:, :, pos[r]], rtol=0, atol=1e-6)  # merges run in float32
        torch.testing.assert_close(dq, ref[0].grad[:, :, pos[r]], rtol=0, atol=1e-6)  # merges run in float32
