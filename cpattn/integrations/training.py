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
from ..packed import packed_position_ids, shard_packed
from ..state import current_state

__all__ = ["DOCUMENTS", "IGNORE_INDEX", "PACKED_KEYS", "all_reduce_grads", "cp_loss", "shard_batch"]

IGNORE_INDEX = -100  # labels that carry no loss, as transformers' losses and F.cross_entropy use it
DOCUMENTS = "documents"  # shard_batch's layout for one packed stream sharded by documents (cpattn.packed)
# transformers' packed-sequence arguments (DataCollatorWithFlattening(return_flash_attn_kwargs=True) makes them,
# models pass them on to attention): under a mesh they mark a batch sharded by documents
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

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
    Other entries pass through unchanged, except transformers' packed-sequence arguments (``cu_seq_lens_q`` and
    the like), which are dropped: in these layouts the documents come from the position ids.

    ``layout="documents"``: one packed stream (a batch of one row, documents one after another, as
    transformers' ``DataCollatorWithFlattening`` makes it) sharded by documents (`cpattn.packed.shard_packed`),
    so that every layer's attention runs the packed ring: balanced causal work, and steps whose keys share no
    document with the local queries skipped. The documents are ``cu_seq_lens_q`` where the batch has it, else
    where a position id does not follow its predecessor by one (transformers' rule), else the whole row. The
    batch comes back with this rank's tokens, their positions within their documents (given position ids must
    be those), labels shifted on the whole stream as above, and the stream's global ``cu_seq_lens_q``/``_k`` and
    ``max_length_q``/``_k``, which the model passes on to attention and which mark the batch as sharded by
    documents. A padding mask is refused: a packed stream holds no padding. With `mesh` None the shard is the
    whole row (one process), ready for a model on one device.
    """
    layout = layout or _active_layout()
    if layout == DOCUMENTS:
        return _shard_documents(batch, mesh, seq_dim, ignore_index)
    out = {k: v for k, v in batch.items() if k not in PACKED_KEYS}
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


def _shard_documents(batch: Mapping[str, Any], mesh, seq_dim: int, ignore_index: int) -> dict:
    """shard_batch's layout="documents" (see there)."""
    if any(k in batch for k in _DECODER_SEQUENCE_KEYS):
        raise InvalidArgumentError("layout='documents' shards the packed stream of a decoder-only model; shard an "
                                   "encoder-decoder batch with layout='zigzag' or 'contiguous'")
    rows, length, device = _batch_shape(batch, _DECODER_ONLY_SEQUENCE_KEYS, seq_dim)
    if rows != 1:
        raise InvalidArgumentError(
            f"layout='documents' shards one packed stream: a batch of one row holding the documents one after "
            f"another (transformers' DataCollatorWithFlattening makes it), got {rows} rows")
    bounds = _stream_bounds(batch, length)
    positions = packed_position_ids(bounds, None).to(device)[None]  # the whole stream's, per document
    given = batch.get("position_ids")
    if isinstance(given, torch.Tensor) and not torch.equal(given.reshape(1, -1).long(), positions):
        raise InvalidArgumentError(
            "position_ids are not each token's position within its document of cu_seq_lens_q (0 at every "
            "document's start, then one more per token): under layout='documents' the attention runs over those "
            "documents, and RoPE must see the same; pass the collator's position ids, or none")
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not (mask.dim() == 2 and bool(mask.all())):
        raise InvalidArgumentError(
            "layout='documents' takes no padding or 4-D attention_mask: a packed stream holds its documents "
            "whole; leave the padding out of the stream (or make it a document of its own, its labels "
            f"{ignore_index})")
    out = {k: v for k, v in batch.items() if k not in PACKED_KEYS}
    if batch.get("labels") is not None:
        out["labels"] = shifted = _shift_left(batch["labels"], seq_dim, ignore_index)
        out["num_items_in_batch"] = (shifted != ignore_index).sum()
    out["position_ids"] = positions
    for name in (*_DECODER_ONLY_SEQUENCE_KEYS, "position_ids", "labels"):
        if isinstance(out.get(name), torch.Tensor):
            out[name] = shard_packed(out[name], bounds, mesh, 1 if name == "position_ids" else seq_dim)
    # all ones: transformers must not read this rank's positions (pieces of documents) as its own packing; the
    # documents reach attention as cu_seq_lens_q
    out["attention_mask"] = torch.ones(1, out["position_ids"].shape[1], dtype=torch.long, device=device)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    if "num_items_in_batch" in out:
        out["shift_labels"] = out["labels"]
    return out


def _stream_bounds(batch: Mapping[str, Any], length: int) -> list[int]:
    """The packed row's document boundaries: cu_seq_lens_q, else from the position ids, else the whole row."""
    cu_q, cu_k = batch.get("cu_seq_lens_q"), batch.get("cu_seq_lens_k")
    if cu_q is not None:
        bounds = [int(b) for b in (cu_q.tolist() if isinstance(cu_q, torch.Tensor) else cu_q)]
        other = None if cu_k is None else [int(b) for b in (cu_k.tolist() if isinstance(cu_k, torch.Tensor) else cu_k)]
        if other is not None and other != bounds:
            raise InvalidArgumentError("layout='documents' is self-attention within each document: cu_seq_lens_k "
                                       "must equal cu_seq_lens_q")
    elif isinstance(batch.get("position_ids"), torch.Tensor):
        ids = batch["position_ids"].reshape(-1).long()
        starts = torch.nonzero(ids.diff() != 1).reshape(-1) + 1
        bounds = [0, *starts.tolist(), ids.numel()]
    else:
        bounds = [0, length]
    if bounds[0] != 0 or bounds[-1] != length or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise InvalidArgumentError(f"cu_seq_lens_q {bounds} must start at 0, never decrease and end at the row's "
                                   f"{length} tokens")
    return bounds


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
