"""One autograd node around a generation's forward and backward kernels (FA4's training path).

The public function on (B, S, H, D) transpose views of (B, H, S, D) tensors is five autograd nodes: its own and
four transposes. `_TransposedFlash` runs the same kernels on the same views as one node, so a training call pays
the autograd bookkeeping of one node; at small shapes that host time sets the pace of FA4's calls.
"""

from __future__ import annotations

import torch

from ...contract import autocast_off


class _TransposedFlash(torch.autograd.Function):
    """A kernel pair that takes (B, S, H, D) tensors, on (B, H, S, D) q, k, v as one autograd node.

    forward runs the forward kernel on transpose views and keeps its (out, lse); backward runs the backward
    kernel on them with dout's transpose view and hands back the gradients' transpose views: the same kernels
    and layouts as the library's public function on transpose views, with the autograd bookkeeping of one node.
    `kernels` is (forward(q, k, v) -> (out, lse), backward(dout, q, k, v, out, lse) -> (dq, dk, dv)).
    """

    @staticmethod
    def forward(ctx, query, key, value, kernels):
        forward, ctx.backward_kernel = kernels
        out, lse = forward(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        ctx.save_for_backward(query, key, value, out, lse)
        return out.transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        query, key, value, out, lse = ctx.saved_tensors
        with autocast_off(dout.device):  # cpattn's own backward computes as it was written, inside autocast too
            dq, dk, dv = ctx.backward_kernel(dout.transpose(1, 2), query.transpose(1, 2), key.transpose(1, 2),
                                             value.transpose(1, 2), out, lse)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


def transposed_training(forward, backward):
    """A function of (B, H, S, D) q, k, v running `forward` and `backward` (see _TransposedFlash) as one node."""
    kernels = (forward, backward)
    return lambda q, k, v: _TransposedFlash.apply(q, k, v, kernels)
