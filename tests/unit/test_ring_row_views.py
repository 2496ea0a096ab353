"""A ring step that needs only some query rows (zigzag, a later source) gets them as the provider declares it can
take them: strided views of the rank's tensors with `Capabilities.row_views`, dense copies without. Both give the
same result."""

from __future__ import annotations

import dataclasses

import torch

from cpattn.cp.comm import CommStats
from cpattn.cp.layout import ring_positions
from cpattn.cp.mesh import Group
from cpattn.cp.ring import RingSpec, ring_backward, ring_forward
from cpattn.call import make_call
from cpattn.providers.native import NativeMath
from loopback_ring import LoopbackRing


class _Recording(NativeMath):
    """_native_math with `row_views` as given, recording the storage of the queries (and dO) each step gets."""

    def __init__(self, row_views: bool):
        super().__init__()
        self.supports = {d: dataclasses.replace(c, row_views=row_views) for d, c in NativeMath.supports.items()}
        self.seen = []

    def forward(self, call):
        self.seen.append(("query", call.query))
        return super().forward(call)

    def backward(self, call, dout, out, lse):
        self.seen.append(("dout", dout))
        return super().backward(call, dout, out, lse)


def _run(provider, world=2, total=12):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3, total, 8) for _ in range(3))
    pos = [ring_positions(total, world, r, "zigzag") for r in range(world)]
    blocks = [(k[:, :, p].contiguous(), v[:, :, p].contiguous()) for p in pos]
    lq = q[:, :, pos[0]].contiguous()
    call = make_call(lq, *blocks[0], None, 0.0, True, None, False)
    spec = RingSpec(Group(None, 0, world, "loopback"), "zigzag", total, 60.0, CommStats(),
                    channel_factory=LoopbackRing(blocks, 0))
    out, lse = ring_forward(provider, call, spec)
    dout = torch.randn_like(lq)
    spec.channel_factory = LoopbackRing(blocks, 0)
    grads = ring_backward(provider, call, spec, dout, out, lse)
    return lq, dout, out, grads


def test_row_views_reach_the_kernel_only_where_declared():
    results = {}
    for row_views in (True, False):
        provider = _Recording(row_views)
        lq, dout, out, grads = _run(provider)
        partial = [(name, t) for name, t in provider.seen if t.shape[2] < lq.shape[2]]
        assert partial, "rank 0 at W=2 has a step with a later source: only its late rows attend"
        for name, t in partial:
            whole = lq if name == "query" else dout
            shares = t.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
            assert shares == row_views, (name, row_views)
            if not row_views:
                assert t.is_contiguous()
        results[row_views] = (out, grads)
    # out and dQ are this rank's own (see LoopbackRing)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    torch.testing.assert_close(results[True][1][0], results[False][1][0], rtol=0, atol=0)
