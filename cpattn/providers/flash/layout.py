"""How (B, H, S, D) calls reach FlashAttention's kernels: transpose views, head-dim padding, varlen packing.

Inputs (B, H, S, D) go to the kernels as (B, S, H, D) transpose views, KV heads unexpanded (GQA is native). Head
dims are zero-padded to a multiple of HEAD_DIM_ALIGN (the kernels' alignment; zeros change no score) and sliced
back; a generation may ask for a wider multiple (`Generation.backward_head_dim_multiple`,
`forward_head_dim_multiple`). `flash_varlen` keeps queries as B full-length sequences and unpads keys and values
into cu_seqlens (`PaddedBatch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...contract import AttentionCall, lse_for_kernel_backward

HEAD_DIM_ALIGN = 8
VARLEN_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def deterministic_algorithms() -> bool:
    """Whether the backward must be deterministic (torch.use_deterministic_algorithms)."""
    return torch.are_deterministic_algorithms_enabled()


def align_head_dim(x: torch.Tensor, multiple: int = HEAD_DIM_ALIGN) -> torch.Tensor:
    """Zero-pad the last dim to a multiple of `multiple` (zero q/k columns change no score, zero v columns are
    sliced off the output; the softmax scale is always passed, so it stays that of the real head dim)."""
    pad = (-x.shape[-1]) % multiple
    return F.pad(x, (0, pad)) if pad else x


def to_kernel_layout(x: torch.Tensor, multiple: int = HEAD_DIM_ALIGN) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H, D) view, head dim padded to a multiple of `multiple`."""
    return align_head_dim(x.transpose(1, 2), multiple)


def from_kernel_layout(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, S, H, D_aligned) -> (B, H, S, dim) view."""
    return x[..., :dim].transpose(1, 2)


@dataclass(frozen=True)
class Packing:
    """cu_seqlens and maximum lengths of a varlen call (int32 tensors on the inputs' device). With `seqused_q` /
    `seqused_k` (the library's seqused arguments, one length per sequence), sequence i is the rows (keys) from
    cu_seqlens[i] on, that many of them: sequences then need not tile the tensor (the launches of
    fa4_sm90_backward.SharedVarlenAccumulator take them; the library's functions are never given them here)."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    seqused_q: "torch.Tensor | None" = None
    seqused_k: "torch.Tensor | None" = None

    def kwargs(self) -> dict:
        return dict(zip(VARLEN_ARGS, (self.cu_seqlens_q, self.cu_seqlens_k, self.max_seqlen_q, self.max_seqlen_k)))


@dataclass(frozen=True)
class PaddedBatch:
    """How a padded (B, H, S, D) batch maps to flash-attn's packed layout: queries stay B full-length
    sequences, keys and values lose the positions a key-padding mask hides."""

    batch: int
    q_len: int
    kv_len: int
    keep: torch.Tensor | None  # (B, Sk) bool, None when no key is hidden
    packing: Packing
    total_k: int
    empty: torch.Tensor | None  # (B,) bool: batch rows without any key, None if there are none
    multiple: int = HEAD_DIM_ALIGN  # head dims are zero-padded to a multiple of this

    @classmethod
    def from_call(cls, call: AttentionCall, multiple: int = HEAD_DIM_ALIGN) -> "PaddedBatch":
        b, sq, sk, device = call.batch, call.q_len, call.kv_len, call.device
        steps = torch.arange(b + 1, dtype=torch.int32, device=device)
        if call.attn_mask is None:
            packing = Packing(steps * sq, steps * sk, sq, sk)
            return cls(b, sq, sk, None, packing, b * sk, None, multiple)
        keep = call.attn_mask.expand(b, 1, 1, sk).reshape(b, sk)
        lengths = keep.sum(dim=1, dtype=torch.int32)
        cu_seqlens_k = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
        host = lengths.tolist()  # one sync: the kernels take max_seqlen_k as a host integer
        empty = lengths == 0 if min(host) == 0 else None
        return cls(b, sq, sk, keep, Packing(steps * sq, cu_seqlens_k, sq, max(host)), sum(host), empty, multiple)

    def pack_queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, Sq, D) -> (B*Sq, H, D_aligned); a copy, since packing merges batch and sequence dims."""
        return align_head_dim(x.transpose(1, 2).reshape(self.batch * self.q_len, x.shape[1], x.shape[3]),
                              self.multiple)

    def unpack_queries(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """(B*Sq, H, D_aligned) -> (B, H, Sq, dim)."""
        return x.reshape(self.batch, self.q_len, x.shape[1], x.shape[2])[..., :dim].transpose(1, 2)

    def pack_keys(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, Sk, D) -> (total_k, H, D_aligned): only the keys the mask keeps."""
        x = x.transpose(1, 2)
        x = x.reshape(self.batch * self.kv_len, x.shape[2], x.shape[3]) if self.keep is None else x[self.keep]
        return align_head_dim(x, self.multiple)

    def unpack_keys(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Gradients (total_k, H, D_aligned) -> (B, H, Sk, dim), zero at hidden keys."""
        x = x[..., :dim]
        if self.keep is None:
            return x.reshape(self.batch, self.kv_len, x.shape[1], dim).transpose(1, 2)
        full = x.new_zeros(self.batch, self.kv_len, x.shape[1], dim)
        full[self.keep] = x
        return full.transpose(1, 2)

    def lse_from_kernel(self, lse: torch.Tensor) -> torch.Tensor:
        """Varlen LSE -> (B, H, Sq): (H, total_q) from flash-attn >= 2.6, FA3, FA4; (B, H, max_seqlen_q) before."""
        if lse.dim() == 2:
            return lse.reshape(lse.shape[0], self.batch, self.q_len).permute(1, 0, 2)
        return lse[..., : self.q_len]

    def lse_to_kernel(self, lse: torch.Tensor) -> torch.Tensor:
        """Contract LSE (B, H, Sq) -> the (H, total_q) layout every supported release's varlen backward reads."""
        return lse_for_kernel_backward(lse).float().permute(1, 0, 2).reshape(lse.shape[1], -1).contiguous()

    def zero_empty_rows(self, out: torch.Tensor, lse: torch.Tensor | None = None):
        """Batch rows without keys: out 0, lse -inf, whatever the kernel left there."""
        if self.empty is None:
            return out, lse
        out = out.masked_fill(self.empty.view(-1, 1, 1, 1), 0.0)
        if lse is not None:
            lse = lse.masked_fill(self.empty.view(-1, 1, 1), float("-inf"))
        return out, lse
