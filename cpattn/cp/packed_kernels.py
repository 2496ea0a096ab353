"""The kernels of the packed ring: one `Chain` (cp/packed_plan.py) forward, or backward given the global rows.

Every tensor here is packed, (tokens, heads, dim): q, dout and out are the chain's rows of the consumer's shard,
k and v the chain's keys of the step's key block, lse (heads, rows) float32 in the contract's form (natural log,
-inf on rows that see no key). A kernel returns the chain's (out, lse) over all its rows, rows between its
pieces included (out 0, lse -inf: they merge as nothing), and its (dq, dk, dv) over all its rows and keys.

Two implementations: a varlen kernel, one call per chain with the chain's `sequences` (cpattn/packed_varlen.py,
which the packed API builds, knowing the provider; on FA4's sm90 kernels its backward steps can add into one dQ
accumulator per rank, `shared_rows`), and `ProviderBlocks`, for any provider of the contract: one
`forward`/`backward` per group of pieces, with the group's dense document mask where the provider takes masks.

Score modifications: a piece's band (`Piece.window`) is its own, in its top-left coordinates; the call's softcap
goes to every kernel call as it is (exact per block, the merge is unchanged); the call's sinks never reach a
kernel: the packed ring joins them once, to the merged rows (cp/packed_ring.py).
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..contract import AttentionCall, Provider
from ..scoremods import as_kernel_call
from .packed_plan import Chain, document_block_mask


class BlockKernel(Protocol):
    """What the packed ring asks of a kernel (see the module docstring)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                chain: Chain) -> tuple[torch.Tensor, torch.Tensor]:
        """(out (rows, Hq, Dv) in the inputs' dtype, lse (Hq, rows) float32)."""

    def backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, chain: Chain) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dv) of the chain, in the inputs' dtype, given its rows' global dout, out and lse."""

    def shared_rows(self, dout: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                    frame: Chain) -> "SharedRows | None":
        """One dQ accumulator over all of a rank's rows (q, dout, out, lse: the rank's), `frame` the diagonal
        step's chain, for the chains of every step that can add into it; None where the kernel keeps none."""


class SharedRows(Protocol):
    """A rank's backward steps adding into one dQ accumulator (`BlockKernel.shared_rows`)."""

    added: bool  # whether any chain was added

    def backward(self, k: torch.Tensor, v: torch.Tensor,
                 chain: Chain) -> "tuple[torch.Tensor, torch.Tensor] | None":
        """(dk, dv) of `chain` against its keys, its dQ added into the accumulator, or None: then the chain runs
        `BlockKernel.backward`."""

    def dq(self) -> torch.Tensor:
        """(rows, Hq, D) dQ of every row of the rank from the chains added, in the inputs' dtype."""


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """(S, H, D) -> the (1, H, S, D) view the contract takes."""
    return x.unsqueeze(0).transpose(1, 2)


def _shd(x: torch.Tensor) -> torch.Tensor:
    """(1, H, S, D) -> (S, H, D) view."""
    return x.squeeze(0).transpose(0, 1)


class ProviderBlocks:
    """A chain on a provider of the contract: per group (`Chain.groups`), one `forward` on views of the group's
    rows and keys, with its document mask where it has more than one piece (the provider then takes boolean
    masks) or with the piece's own causal flag and band (a band the provider has no window for becomes a mask:
    scoremods.as_kernel_call). `call` is the packed call whose scale, flags and softcap every block keeps."""

    def __init__(self, provider: Provider, call: AttentionCall, masks: bool):
        self.provider, self.call, self.masks = provider, call, masks

    def _block(self, group: Chain, q, k, v) -> AttentionCall:
        # masks are made again for the backward rather than kept: they are small, the forward's steps many
        lone = len(group.pieces) == 1
        mask = None if lone else document_block_mask(group, q.device)
        return as_kernel_call(self.provider, self.call.replace(
            query=_bhsd(q[group.q0:group.q1]), key=_bhsd(k[group.k0:group.k1]), value=_bhsd(v[group.k0:group.k1]),
            attn_mask=mask, is_causal=lone and group.pieces[0].causal,
            window=group.pieces[0].window if lone else None, sinks=None))

    def forward(self, q, k, v, chain):
        rows, heads = q.shape[0], q.shape[1]
        out = q.new_zeros(rows, heads, v.shape[-1])
        lse = torch.full((heads, rows), float("-inf"), dtype=torch.float32, device=q.device)
        for group in chain.groups(self.masks):
            out_g, lse_g = self.provider.forward(self._block(group, q, k, v))
            out[group.q0:group.q1] = _shd(out_g)
            lse[:, group.q0:group.q1] = lse_g[0]
        return out, lse

    def shared_rows(self, dout, q, out, lse, frame):
        return None  # the contract's backward returns each block's dQ

    def backward(self, dout, q, k, v, out, lse, chain):
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for group in chain.groups(self.masks):
            rows = slice(group.q0, group.q1)
            parts = self.provider.backward(self._block(group, q, k, v), _bhsd(dout[rows]), _bhsd(out[rows]),
                                           lse[:, rows].unsqueeze(0))
            dq[rows] = _shd(parts[0])
            dk[group.k0:group.k1] = _shd(parts[1])
            dv[group.k0:group.k1] = _shd(parts[2])
        return dq, dk, dv
