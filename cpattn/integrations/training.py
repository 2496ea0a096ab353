"""A transformers-style batch under a mesh: this rank's shard of it, the loss over the global token count, and
the gradient sum that makes the ranks' gradients those of one process. Re-exported by
`cpattn.integrations.transformers`, whose docstring tells the rules a sharded batch follows; nothing here needs
transformers itself.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..cp import shard_sequence
from ..cp.mesh import topology_from_mesh
from ..errors import InvalidArgumentError
from ..state import current_state

__all__ = ["IGNORE_INDEX", "all_reduce_grads", "cp_loss", "shard_batch"]

IGNORE_INDEX = -100  # labels that carry no loss, as transformers' losses and F.cross_entropy use it

_DECODER_ONLY_SEQUENCE_KEYS = ("input_ids", "inputs_embeds", "token_type_ids")
_DECODER_SEQUENCE_KEYS = ("decoder_input_ids", "decoder_inputs_embeds")


def shard_batch(batch: Mapping[str, Any], mesh, *, seq_dim: int = 1, layout: str | None = None,
                ignore_index: int = IGNORE_INDEX) -> dict:
    """This rank's shard of a full batch (the same batch on every rank), ready for ``model(**batch)`` under
    ``attention_provider(..., cp_mesh=mesh)``. `layout` defaults to the active block's cp_layout, else zigzag.

    Causal LM batches (``input_ids`` or ``inputs_embeds``, ``attention_mask``, ``position_ids``, ``labels``,
    ``token_type_ids``): every sequence tensor is sharded along `seq_dim`;
    * ``labels`` are shifted first (a token's target is the next token of the whole sequence, which may live on
      another rank) and come back as this rank's shifted targets, also as ``shift_labels``, with
      ``num_items_in_batch`` (the global count of counted targets): transformers' causal-LM loss then sums this
      rank's token losses over the global count, so ``model(**batch).loss`` is this rank's share of the loss;
    * ``position_ids`` (given: per document for packed batches; else 0..S-1) become the tokens' global positions;
    * ``attention_mask``: a 2-D one is sharded, and all ones where the batch has none (over more than one rank),
      so that transformers never reads a shard's positions as packed sequences; a 4-D one keeps all keys and
      loses the other ranks' rows.
    Encoder-decoder batches (``decoder_input_ids`` or ``decoder_inputs_embeds`` present): the decoder's tensors
    (those, ``decoder_attention_mask``, ``decoder_position_ids``, ``labels``, not shifted) are sharded; the
    encoder's inputs stay whole; such models' own losses are this rank's mean, so take `cp_loss` of the logits.
    Other entries pass through unchanged.
    """
    layout = layout or _active_layout()
    out = dict(batch)
    if any(k in batch for k in _DECODER_SEQUENCE_KEYS):
        keys, mask_key, positions_key = _DECODER_SEQUENCE_KEYS, "decoder_attention_mask", "decoder_position_ids"
    else:
        keys, mask_key, positions_key = _DECODER_ONLY_SEQUENCE_KEYS, "attention_mask", "position_ids"
        if batch.get("labels") is not None:
            out["labels"] = shifted = _shift_left(batch["labels"], seq_dim, ignore_index)
            out["num_items_in_batch"] = (shifted != ignore_index).sum()
    batch_size, length, device = _batch_shape(batch, keys, seq_dim)
    if out.get(positions_key) is None:
        out[positions_key] = torch.arange(length, device=device).expand(batch_size, length)
    if out.get(mask_key) is None and topology_from_mesh(mesh).world_size > 1:
        # one rank's positions jump (zigzag) and would read as packed sequences; one rank holds them all
        out[mask_key] = torch.ones(batch_size, length, dtype=torch.long, device=device)
    shard = lambda t, dim=seq_dim: shard_sequence(t, mesh, dim, layout)  # noqa: E731
    for name in (*keys, positions_key, "labels"):
        if isinstance(out.get(name), torch.Tensor):
            out[name] = shard(out[name])
    mask = out.get(mask_key)
    if isinstance(mask, torch.Tensor):
        out[mask_key] = shard(mask, -2) if mask.dim() == 4 else shard(mask)
    if "num_items_in_batch" in out:
        out["shift_labels"] = out["labels"]
    return out


def _active_layout() -> str:
    cp = current_state().cp
    return cp.layout if cp is not None else "zigzag"


def _shift_left(labels: torch.Tensor, dim: int, ignore_index: int) -> torch.Tensor:
    """Each token's target: the next label along `dim`, ignore_index for the last (transformers' causal-LM
    shift, done on the whole sequence)."""
    tail = labels.narrow(dim, 1, labels.shape[dim] - 1)
    pad = torch.full_like(labels.narrow(dim, 0, 1), ignore_index)
    return torch.cat([tail, pad], dim=dim)


def _batch_shape(batch: Mapping[str, Any], keys: Iterable[str], seq_dim: int):
    for name in keys:
        t = batch.get(name)
        if isinstance(t, torch.Tensor):
            return t.shape[0], t.shape[seq_dim], t.device
    raise InvalidArgumentError(f"shard_batch needs one of {', '.join(keys)} in the batch to know its sequences")


def cp_loss(logits: torch.Tensor, labels: torch.Tensor, mesh=None, *, ignore_index: int = IGNORE_INDEX
            ) -> torch.Tensor:
    """Cross-entropy of this rank's tokens: the sum of their losses over the global number of counted tokens
    (all-reduced over `mesh`; without one, this process's count: the usual mean). Summed over the ranks, its
    gradients are those of the mean loss of one process holding the whole batch (`all_reduce_grads` sums them).

    `labels` are the targets of the tokens, as shard_batch returns them (shifted for causal LMs)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    targets = labels.reshape(-1).to(flat.device)
    total = F.cross_entropy(flat, targets, ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum()
    if mesh is not None:
        count = _all_reduce_sum(count, mesh)
    return total / count.clamp_min(1)


def all_reduce_grads(parameters, mesh) -> None:
    """Sum every parameter's gradient over the ranks of `mesh` (a module or an iterable of parameters): after
    a backward of `cp_loss` (or the loss of a shard_batch batch) on every rank, the gradients of one process.
    A parameter a rank did not use (an MoE expert no local token chose) takes part with zeros."""
    params = parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict = {}
    for p in params:  # one all-reduce per (device, dtype) rather than one per parameter
        buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    for group in buckets.values():
        flat = _all_reduce_sum(torch.cat([p.grad.reshape(-1) for p in group]), mesh)
        for p, part in zip(group, flat.split([p.numel() for p in group])):
            p.grad.copy_(part.view_as(p.grad))


@torch.no_grad()
def _all_reduce_sum(x: torch.Tensor, mesh) -> torch.Tensor:
    x = x.clone()
    t = topology_from_mesh(mesh)
    for group in (g for g in (t.ulysses, t.ring) if g is not None):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group.pg)
    return x
