"""transformers models on cpattn: ``attn_implementation="cpattn"``, on one device and context-parallel.

Importing this module registers the name ``"cpattn"`` with transformers (``register()`` does it again, harmlessly):
its attention function in ``AttentionInterface`` and its mask function in ``AttentionMaskInterface`` (transformers
builds no mask at all for a name that only the first knows). Then, as with any attention implementation::

    import cpattn, cpattn.integrations.transformers
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="cpattn")   # or from_config(...)
    model.set_attn_implementation("cpattn")                                           # a model already built
    with cpattn.attention_provider("flash"):
        model.generate(**inputs)                 # one device; KV cache, sliding windows, softcap, sinks

Every layer's attention then runs on the active cpattn provider, also for models that declare no SDPA support
(Gemma 2, gpt-oss): what transformers passes maps onto ``attention_dispatch``: ``scaling`` -> scale, ``dropout``
-> dropout_p (while the module trains), ``module.is_causal`` -> is_causal, ``sliding_window=W`` ->
``window=(W - 1, 0)``, ``softcap``, ``s_aux`` -> sinks, differing head counts -> enable_gqa, padding and packed
masks, T5's ``position_bias`` (as an additive mask, one device). What cannot be honoured (``head_mask``,
``output_attentions=True``, a paged cache) raises an error naming the layer.

Context parallel (each rank holds a shard of every sequence; a training step reads as it does on one device)::

    with cpattn.attention_provider("flash", cp_mesh=mesh):
        batch = shard_batch(full_batch, mesh)     # the same full batch on every rank; this rank's shard out
        loss = model(**batch).loss                # causal LMs; any model: cp_loss(logits, batch["labels"], mesh)
        loss.backward()
    all_reduce_grads(model, mesh)                 # SUM over the mesh: the gradients of one process

Under a mesh (rules every rank applies alike, so every rank raises the same error):

* Position ids: the model must get each token's global position (per document in packed batches; shard_batch
  makes them). Where the model passes them to attention, cpattn gathers them once per forward and refuses ids
  that are 0..n-1 on every rank (what a model makes when none are passed) or the same on every rank.
* Documents: a position id that does not follow its predecessor by one starts a new document (transformers'
  packed-sequence rule), read from the gathered ids, for every model that passes position ids to attention.
* A packed row sharded by documents (``shard_batch(batch, mesh, layout="documents")``): the global
  ``cu_seq_lens_q`` it adds reach every layer, which then runs `cpattn.packed.packed_attention` (the packed
  ring) with the layer's causal flag, window, softcap and sinks; its position ids are checked against the
  document layout on every rank. On one device ``cu_seq_lens_q`` with no mask tensor run the same way (gpt-oss
  builds its masks without position ids, so its own packed row attends across documents).
* Masks: a 2-D attention_mask is this rank's shard (shard_batch shards it and passes all ones where the batch
  has none, so that transformers never reads a shard's positions as packed sequences). A 4-D mask is this
  rank's query rows by all keys in global order, and is the whole mask, as SDPA takes it (no causal flag or
  window is added to it). Masks transformers builds with other overlays (image tokens, blocks, chunked
  attention) or for a filled KV cache are refused.
* Gradient checkpointing (``model.gradient_checkpointing_enable()``): the backward recomputes each layer, also
  outside the forward's block and on autograd's own threads; the recomputation runs in the state the layer's
  mask was built under, as the forward did. (A model whose attention gets no mask from cpattn's mask function
  has no such state to recompute in: train it without checkpointing under a mesh. On one device, or a mesh of
  one rank, no state is carried: the recomputation runs on the provider active at backward time, so call
  backward inside the block.)
* Encoder-decoder models: their encoders build positions inside (learned, sinusoidal, relative), so encoder
  inputs stay whole on every rank and only the decoder's tokens are sharded. Non-causal attention of such a
  model (the encoder's, the cross-attention) then runs on each rank against keys it holds whole
  (``kv_replicated=True``), which is exact; each rank's encoder gradients are its share, summed by
  `all_reduce_grads`. Causal attention (the decoder's own) is context-parallel. T5's relative position bias
  cannot be sharded and is refused; so is a decoder that takes no position ids (BART and the families built
  like it: its positions would restart at 0 on every rank's shard).

Versions: tested with transformers 5.23.0 (the ``dev`` extra pins it). Expected to work with transformers 5.x
(>= 5.0, < 6): it relies on ``AttentionInterface``, ``AttentionMaskInterface`` and the keyword arguments
``masking_utils`` passes to a mask function, which 5.x keeps. Other major versions warn on import.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)

from ..cp.comm import all_gather_padded, gather_signatures
from ..cp.layout import shard_positions
from ..dispatch import attention_dispatch
from ..errors import CpattnError, InvalidArgumentError, UnsupportedInputError
from ..packed import packed_attention
from ..state import STATE_VAR, current_state
from .training import DOCUMENTS, IGNORE_INDEX, all_reduce_grads, cp_loss, shard_batch

__all__ = [
    "DOCUMENTS", "IGNORE_INDEX", "NAME", "ShardedMask", "TESTED_VERSION", "all_reduce_grads", "cp_loss",
    "cpattn_attention_forward", "cpattn_mask", "layer_name", "register", "shard_batch",
]

NAME = "cpattn"
TESTED_VERSION = "5.23.0"

if not transformers.__version__.startswith("5."):
    warnings.warn(f"cpattn.integrations.transformers is written for transformers 5.x (tested with {TESTED_VERSION}); "
                  f"transformers {transformers.__version__} is installed", stacklevel=2)


def register(name: str = NAME) -> None:
    """Register cpattn with transformers under `name`: `attn_implementation=name` then routes every layer's
    attention through cpattn. Idempotent (registering again replaces the entries with the same functions)."""
    AttentionInterface.register(name, cpattn_attention_forward)
    AttentionMaskInterface.register(name, cpattn_mask)


# -- the attention function ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """What one layer asked for, in cpattn's terms."""

    causal: bool
    dropout_p: float
    scale: float | None
    sliding_window: int | None
    softcap: float | None
    sinks: torch.Tensor | None
    position_bias: torch.Tensor | None

    @property
    def causal_window(self) -> "tuple[int, int] | None":
        # transformers: key j is visible to query i iff 0 <= i - j < sliding_window
        return (self.sliding_window - 1, 0) if self.causal and self.sliding_window else None


def cpattn_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention function for ``attn_implementation="cpattn"``: q, k, v as (B, H, S, D) in, the
    output as (B, S, H, D) and no attention weights out."""
    layer = layer_name(module)
    reasons = _refusals(kwargs)
    if reasons:
        raise UnsupportedInputError(f"{layer} under attn_implementation='cpattn'", reasons)
    call = _Call(
        causal=bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)),
        dropout_p=float(dropout) if module.training else 0.0,
        scale=scaling, sliding_window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap"),
        sinks=kwargs.get("s_aux"), position_bias=kwargs.get("position_bias"))
    with _forward_state_for_recomputation(attention_mask):
        return _attention(module, layer, query, key, value, attention_mask, call, kwargs)


def _attention(module, layer: str, query, key, value, attention_mask, call: "_Call", kwargs) -> tuple:
    cp = _sharding()
    try:
        if kwargs.get("cu_seq_lens_q") is not None and (cp is not None or attention_mask is None):
            # packed documents: sharded by them under a mesh; on one device where no mask tensor holds them
            out = _documents(query, key, value, attention_mask, call, kwargs)
        elif cp is None:
            out = _one_device(query, key, value, attention_mask, call)
        elif _keys_whole_on_every_rank(module, query, key, call.causal):
            out = _whole_keys(query, key, value, attention_mask, call)
        else:
            if call.position_bias is None:  # a bias is refused on its own (_sharded)
                _check_positions_reach(module)
            out = _sharded(cp, query, key, value, attention_mask, call, kwargs.get("position_ids"))
    except CpattnError as exc:
        raise _in_layer(exc, layer) from exc
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _forward_state_for_recomputation(mask):
    """Gradient checkpointing recomputes a layer in the backward, which may run outside the forward's
    attention_provider block (after it, or on autograd's device threads, which never see the block's context).
    A mask built under a mesh carries the state it was built under: a recomputation (a call while autograd runs
    a backward, under no state) runs in it again, as the forward ran; every rank recomputes the same layers in
    the same order, so their collectives match."""
    state = mask.state if isinstance(mask, ShardedMask) else None
    if state is None or STATE_VAR.get() is not None or torch._C._current_graph_task_id() == -1:
        yield
        return
    token = STATE_VAR.set(state)
    try:
        yield
    finally:
        STATE_VAR.reset(token)


def layer_name(module: torch.nn.Module) -> str:
    index = getattr(module, "layer_idx", None)
    return type(module).__name__ + (f" (layer {index})" if index is not None else "")


def _refusals(kwargs: Mapping[str, Any]) -> list[str]:
    out = [f"{name} is not supported: cpattn never forms the attention weights a head mask scales; drop it, or use "
           "attn_implementation='eager'" for name in ("head_mask", "layer_head_mask") if kwargs.get(name) is not None]
    if kwargs.get("output_attentions"):
        out.append("output_attentions=True is not supported: cpattn never forms the attention weights; use "
                   "attn_implementation='eager' to get them")
    if kwargs.get("cache") is not None:  # transformers passes its paged cache (continuous batching) as `cache`
        out.append("a paged KV cache (continuous batching) is not supported: use model.generate()")
    return out


def _in_layer(exc: CpattnError, layer: str) -> CpattnError:
    """The same error, its message led by the layer's name (errors keep their type, so callers' handlers hold)."""
    text = str(exc)
    if text.startswith(layer):
        return exc
    named = exc.__class__.__new__(exc.__class__)
    named.__dict__.update(exc.__dict__)
    named.args = (f"{layer}: {text}",)
    return named


def _sharding():
    """The active ContextParallel where the sequence is sharded over more than one rank, else None."""
    cp = current_state().cp
    return cp if cp is not None and cp.world_size > 1 else None


def _enable_gqa(query: torch.Tensor, key: torch.Tensor) -> bool:
    return query.shape[-3] != key.shape[-3]


def _one_device(query, key, value, mask, call: _Call) -> torch.Tensor:
    """What transformers' SDPA function computes, with the score modifications SDPA lacks."""
    if isinstance(mask, ShardedMask):  # a mask built under a mesh, used outside it
        raise InvalidArgumentError("this mask was built under a mesh (cpattn.attention_provider(..., cp_mesh=...)) "
                                   "but the attention runs on one device: build the mask and run in one block")
    q_len, kv_len = query.shape[-2], key.shape[-2]
    position_bias, window = call.position_bias, None
    is_causal = mask is None and call.causal and q_len > 1  # one query sees every cached key: bottom-right causal
    if is_causal and kv_len > q_len:
        # transformers passes no mask with more keys than queries only for the prefill of an empty static cache,
        # whose keys past q_len are unfilled slots: top-left causal over the first q_len keys is the model's mask
        key, value = key[..., :q_len, :], value[..., :q_len, :]
        position_bias = position_bias[..., :q_len] if position_bias is not None else None
    elif is_causal:
        window = call.causal_window
    if position_bias is not None:
        mask, is_causal = _with_position_bias(position_bias, mask, is_causal, q_len, key.shape[-2]), False
    return attention_dispatch(query, key, value, mask, call.dropout_p, is_causal, call.scale,
                              _enable_gqa(query, key), window=window, softcap=call.softcap, sinks=call.sinks)


def _with_position_bias(bias, mask, is_causal: bool, q_len: int, kv_len: int) -> torch.Tensor:
    """An additive mask holding the bias where a key is visible (T5's relative position bias), as transformers'
    SDPA path builds it."""
    lowest = torch.finfo(bias.dtype).min
    if mask is None:
        if not is_causal:
            return bias
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=bias.device).tril()
        return torch.where(visible, bias, lowest)
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, lowest)
    return bias + mask


def _keys_whole_on_every_rank(module, query, key, causal: bool) -> bool:
    """Under a mesh: whether this call attends to keys every rank holds whole (cross-attention), so that each
    rank's queries' part is exact on its own. Causal attention never does (it is the sharded sequence attending
    to itself). Non-causal attention of an encoder-decoder model always does: its encoder's inputs stay whole
    (see the module's docstring), and so do the keys its decoder's cross-attention reads. Elsewhere a key length
    that differs from the query length says so, and cpattn's agreement check makes every rank take it alike."""
    if causal:
        return False
    if getattr(getattr(module, "config", None), "is_encoder_decoder", False):
        return True
    return query.shape[-2] != key.shape[-2]


def _whole_keys(query, key, value, mask, call: _Call) -> torch.Tensor:
    """This rank's queries (all of them, in an encoder) against keys whole on every rank: no key moves, and
    each rank's key/value gradient is its share, completed by the gradient sum over the ranks."""
    if call.position_bias is not None:
        raise UnsupportedInputError("context parallelism", [_POSITION_BIAS])
    if isinstance(mask, ShardedMask):
        raise InvalidArgumentError(mask.refused or "this call attends to keys every rank holds whole, but its mask "
                                   "was built for sharded keys; pass the mask of the whole key sequence")
    return attention_dispatch(query, key, value, mask, call.dropout_p, False, call.scale, _enable_gqa(query, key),
                              softcap=call.softcap, sinks=call.sinks, kv_replicated=True)


_POSITION_BIAS = ("position_bias (a relative position bias, T5's) is built by the model from each rank's local "
                  "lengths, and T5's decoder cannot be sharded with it: run this model on one device")


def _check_positions_reach(module: torch.nn.Module) -> None:
    """Refuse sharded attention in a model family that cannot be given its tokens' positions: its decoder (or
    model) embeds positions from the input length alone, so under a mesh every rank's shard would restart at
    position 0 and nothing downstream could tell (BART and the families copied from it)."""
    family = type(module).__module__
    if not _family_takes_positions(family):
        raise UnsupportedInputError("context parallelism", [
            f"{family.rsplit('.', 1)[-1]} builds its decoder's positions from the input length and takes no "
            "position ids, so every rank's shard would restart at position 0: run this model on one device (or "
            "context-parallelise only its encoder's inputs, which stay whole)"])


@functools.lru_cache(maxsize=None)
def _family_takes_positions(family: str) -> bool:
    """Whether the model classes of `family` (a transformers modeling module) that embed token ids take position
    ids: its decoders where it has any (encoder-decoder models shard only the decoder), else its models. True
    where the module holds no such class (nothing to go by)."""
    try:
        classes = [c for c in vars(importlib.import_module(family)).values()
                   if isinstance(c, type) and issubclass(c, torch.nn.Module) and c.__module__ == family]
    except ImportError:
        return True
    embedding = [c for c in classes if "input_ids" in inspect.signature(c.forward).parameters]
    decoders = [c for c in embedding if c.__name__.endswith("Decoder")]
    chosen = decoders or [c for c in embedding if c.__name__.endswith("Model")]
    return not chosen or any("position_ids" in inspect.signature(c.forward).parameters for c in chosen)


def _sharded(cp, query, key, value, mask, call: _Call, position_ids) -> torch.Tensor:
    """A layer's attention over the sharded sequence: its mask, window and documents in global positions."""
    if query.shape[-2] != key.shape[-2]:
        raise UnsupportedInputError("causal attention under context parallelism", [
            f"{key.shape[-2]} keys for {query.shape[-2]} queries: a KV cache continues on one device; under a mesh "
            "every forward covers the whole (sharded) sequence: pass use_cache=False, or generate on one device "
            "(or with cpattn.sharded_kv_attention)"])
    if call.position_bias is not None:
        raise UnsupportedInputError("context parallelism", [_POSITION_BIAS])
    attn_mask, padding, is_causal, window = _sharded_mask_args(mask, call)
    if attn_mask is not None:
        _check_all_keys(cp, attn_mask, query.shape[-2])
    documents = _global_positions(cp, position_ids).documents if position_ids is not None else None
    if attn_mask is None:
        attn_mask = _mask_mod(padding, documents, query.shape[0])
    return attention_dispatch(query, key, value, attn_mask, call.dropout_p, is_causal, call.scale,
                              _enable_gqa(query, key), window=window, softcap=call.softcap, sinks=call.sinks)


def _documents(query, key, value, mask, call: _Call, kwargs) -> torch.Tensor:
    """A layer's attention over one packed stream sharded by documents (shard_batch(..., layout="documents")):
    `cpattn.packed.packed_attention` on this rank's tokens and the stream's global cu_seq_lens_q, the layer's
    causal flag, window, softcap and sinks per document, its position ids checked against the document layout
    on every rank (a batch sharded otherwise is refused, not attended wrongly)."""
    reasons = _documents_refusals(query, key, call, kwargs)
    cu_q, cu_k, positions = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k"), kwargs.get("position_ids")
    stream = None if reasons else _LAST_STREAM.get(current_state().cp, (cu_q, cu_k, positions),
                                                   lambda: _Stream(cu_q, cu_k))
    if stream is not None and not stream.self_attention:
        reasons.append("cu_seq_lens_k differs from cu_seq_lens_q: packed documents are self-attention")
    if reasons:
        raise UnsupportedInputError("packed documents (cu_seq_lens_q)", reasons)
    is_causal, window = _documents_mask_args(mask, call)
    positions = None if stream.positions_checked else positions
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (tokens, heads, head dim)
    out = packed_attention(q, k, v, stream.cu_seqlens, is_causal=is_causal, scale=call.scale, window=window,
                           softcap=call.softcap, sinks=call.sinks,
                           position_ids=None if positions is None else positions.reshape(-1))
    stream.positions_checked = True  # reached only where every rank's check passed (or none was given)
    return out.transpose(0, 1).unsqueeze(0)


class _PerForward:
    """A value made from tensors that every layer of a forward gets alike (position ids, cu_seq_lens_q), made
    once per forward: again only where one of them is another tensor, or was changed in place (its version
    counter), or the ContextParallel differs. Every rank runs the same model code, so the cache hits and misses
    alike on every rank."""

    def __init__(self):
        self._key: tuple | None = None
        self._value = None

    def get(self, cp, tensors: tuple, compute):
        key = (id(cp), *((weakref.ref(t), t._version) if isinstance(t, torch.Tensor) else (None, None)
                         for t in tensors))
        if not _same_key(self._key, key):
            self._value = compute()
            self._key = key
        return self._value


def _same_key(old: tuple | None, new: tuple) -> bool:
    return old is not None and old[0] == new[0] and all(_same_tensor(a, b) for a, b in zip(old[1:], new[1:]))


def _same_tensor(a: tuple, b: tuple) -> bool:
    """Whether two (weak reference, version) keys are the same tensor unchanged, or both no tensor."""
    (ref_a, version_a), (ref_b, version_b) = a, b
    if ref_a is None or ref_b is None:
        return ref_a is ref_b
    return ref_a() is not None and ref_a() is ref_b() and version_a == version_b


class _Stream:
    """A forward's packed stream as its layers' attention takes it: the boundaries on the host (int32, CPU:
    packed_attention reads them there without a device sync), whether cu_seq_lens_k agrees, and whether a
    layer's check of the position ids has passed on every rank (the later layers then pass none to check)."""

    def __init__(self, cu_q: torch.Tensor, cu_k):
        bounds = cu_q.tolist()
        self.cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
        self.self_attention = cu_k is None or cu_k.tolist() == bounds
        self.positions_checked = False


_LAST_STREAM = _PerForward()  # every layer gets the same cu_seq_lens_q and position ids: read and checked once


def _documents_refusals(query, key, call: _Call, kwargs) -> list[str]:
    """What a layer asks that the packed schedules cannot give it (the same on every rank: the model's code
    and the batch's shape decide)."""
    out, cu_q, positions = [], kwargs["cu_seq_lens_q"], kwargs.get("position_ids")
    if query.shape[0] != 1:
        out.append(f"{query.shape[0]} rows: a stream sharded by documents is one packed row (shard_batch(batch, "
                   "mesh, layout='documents'))")
    if query.shape[-2] != key.shape[-2]:
        out.append(f"{key.shape[-2]} keys for {query.shape[-2]} queries: a stream sharded by documents is "
                   "self-attention without a KV cache; pass use_cache=False")
    if not isinstance(cu_q, torch.Tensor) or cu_q.dtype.is_floating_point or cu_q.dim() != 1:
        out.append("cu_seq_lens_q must be a 1-D integer tensor (shard_batch(..., layout='documents') makes it)")
    if call.dropout_p:
        out.append(f"attention dropout {call.dropout_p}: the packed schedules take none; set the model's "
                   "attention dropout to 0, or shard by position (shard_batch's default layout)")
    if call.position_bias is not None:
        out.append(_POSITION_BIAS)
    if positions is not None and (positions.dim() != 2 or positions.shape[0] != 1):
        out.append(f"position_ids of shape {tuple(positions.shape)}: a stream sharded by documents reads one "
                   "row of positions (1, tokens)")
    return out


def _documents_mask_args(mask, call: _Call):
    """(is_causal, window) of a layer over packed documents, from the mask cpattn's mask function built."""
    if isinstance(mask, ShardedMask):
        if mask.refused:
            raise InvalidArgumentError(mask.refused)
        if mask.key_padding is not None:
            raise InvalidArgumentError("a padding mask over a stream sharded by documents: a packed stream holds "
                                       "its documents whole; leave the padding out (shard_batch(..., "
                                       "layout='documents') refuses it)")
        return mask.causal, mask.window
    if mask is None:
        return call.causal, call.causal_window
    raise InvalidArgumentError("a tensor attention mask over a stream sharded by documents: the documents come "
                               "from cu_seq_lens_q; pass a 2-D attention_mask of ones, as shard_batch(..., "
                               "layout='documents') does")


def _sharded_mask_args(mask, call: _Call):
    """(tensor mask, global key padding, is_causal, window) from what the layer got as its attention mask."""
    if isinstance(mask, ShardedMask):
        if mask.refused:
            raise InvalidArgumentError(mask.refused)
        return None, mask.key_padding, mask.causal, mask.window
    if mask is None:  # a mask no mask function built: the module's own flags, as transformers' SDPA reads them
        return None, None, call.causal, call.causal_window
    if isinstance(mask, torch.Tensor):  # local query rows x all keys in global order: the whole mask, as in SDPA
        return mask, None, False, None
    raise InvalidArgumentError(f"attention mask of type {type(mask).__name__} cannot be sharded: pass a 2-D "
                               "attention_mask (this rank's shard) or a 4-D tensor (local rows x all keys)")


def _check_all_keys(cp, mask: torch.Tensor, local_len: int) -> None:
    """A 4-D mask under a mesh covers all keys of the sequence: one built for this rank's tokens alone (what
    transformers makes from a shard) covers only the local ones."""
    total = _sum_over_ranks(cp, local_len, mask.device)
    if mask.shape[-1] != total:
        raise InvalidArgumentError(
            f"the 4-D attention mask has {mask.shape[-1]} keys, but the sequence has {total} tokens over the mesh: "
            "under a mesh it covers this rank's query rows by all keys in global order (a mask built for this "
            "rank's tokens sees only them). Pass this rank's shard of the 2-D attention_mask (shard_batch does), "
            "or build the rows x all keys, e.g. with cpattn.document_mask(cu_seqlens, mesh)")


def _mask_mod(padding: torch.Tensor | None, documents: torch.Tensor | None, batch: int):
    """A cpattn mask_mod over global positions: keys that are not padding, of the query's own document."""
    if padding is None and documents is None:
        return None
    if documents is not None:
        documents = documents.expand(batch, -1)

    def mask_mod(b, h, q, kv):
        keep = padding[b, kv] if padding is not None else None
        if documents is not None:
            same = documents[b, q] == documents[b, kv]
            keep = same if keep is None else keep & same
        return keep
    return mask_mod


# -- positions under a mesh ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Positions:
    documents: torch.Tensor | None  # (B or 1, S) document index of every global position, None for one per row


_LAST_POSITIONS = _PerForward()  # the position ids of the last forward, gathered


def _global_positions(cp, position_ids: torch.Tensor) -> _Positions:
    return _LAST_POSITIONS.get(cp, (position_ids,), lambda: _positions_of(cp, position_ids))


def _positions_of(cp, position_ids: torch.Tensor) -> _Positions:
    if position_ids.dim() != 2:  # multimodal RoPE (3, B, S) and the like: per-section positions cpattn cannot read
        raise InvalidArgumentError(f"position_ids of shape {tuple(position_ids.shape)}: under a mesh cpattn reads "
                                   "(batch, tokens) position ids only")
    full = _gather_tokens(position_ids.long(), cp, 1)
    forgotten = _forgotten_positions(full, cp)
    if forgotten:
        raise InvalidArgumentError(
            f"position_ids are {forgotten}: under a mesh every token needs its global position (per document in "
            "packed batches), else RoPE and the mask see shard-local positions. Pass the batch through "
            "cpattn.integrations.transformers.shard_batch(batch, mesh), or position_ids=cpattn.local_position_ids("
            "S, mesh) for one document per row")
    # transformers' packed-sequence rule: a position that does not follow its predecessor by one starts a document
    starts = torch.diff(full, prepend=full[:, :1] - 1, dim=-1) != 1
    return _Positions(starts.cumsum(-1) if bool(starts[:, 1:].any()) else None)


def _forgotten_positions(full: torch.Tensor, cp) -> str | None:
    """Why the gathered position ids look like ones each rank made alone, or None."""
    t = cp.topology
    shards = [full[:, index.to(full.device)] for index in
              shard_positions(full.shape[-1], t.ring_size, t.ulysses_size, cp.layout)]
    if all(torch.equal(s, torch.arange(s.shape[-1], device=s.device).expand_as(s)) for s in shards):
        return "0..n-1 on every rank (what the model makes when it gets none)"
    if all(torch.equal(s, shards[0]) for s in shards[1:]):
        return "the same on every rank"
    return None


def _gather_tokens(x: torch.Tensor, cp, dim: int) -> torch.Tensor:
    """Every rank's shard of `x` along `dim`, reassembled in global order (cpattn.gather_sequence, for the
    active ContextParallel rather than a mesh)."""
    t = cp.topology
    gathered = x
    for group in (g for g in (t.ulysses, t.ring) if g is not None):  # Ulysses parts make up a ring shard
        lengths = gather_signatures([gathered.shape[dim]], group, cp.timeout, x.device)[:, 0].tolist()
        gathered = torch.cat(all_gather_padded(gathered, lengths, dim, group, cp.timeout), dim=dim)
    order = torch.cat(shard_positions(gathered.shape[dim], t.ring_size, t.ulysses_size, cp.layout)).to(x.device)
    out = torch.empty_like(gathered)
    out.index_copy_(dim, order, gathered)
    return out


def _sum_over_ranks(cp, value: int, device) -> int:
    for group in (g for g in (cp.topology.ulysses, cp.topology.ring) if g is not None):
        value = int(gather_signatures([value], group, cp.timeout, torch.device(device))[:, 0].sum())
    return value


def _max_over_ranks(cp, values: list[int], device) -> list[int]:
    """The elementwise maximum of small integer lists over every rank of the mesh (one all-gather per dim)."""
    for group in (g for g in (cp.topology.ulysses, cp.topology.ring) if g is not None):
        values = gather_signatures(values, group, cp.timeout, torch.device(device)).max(dim=0).values.tolist()
    return values


# -- the mask function -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pattern:
    """A mask transformers builds from positions alone: causal or not, within a window (cpattn's convention)."""

    causal: bool
    window: "tuple[int, int] | None" = None

    def visible(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        keep = kv <= q if self.causal else torch.ones_like(q, dtype=torch.bool)
        if self.window is not None:
            keep = keep & (kv >= q - self.window[0]) & (kv <= q + self.window[1])
        return keep


@dataclass(frozen=True, eq=False)
class ShardedMask:
    """What a layer's mask is under a mesh, in global positions, in place of a tensor transformers would build
    from one rank's shard: the pattern, the whole key padding (gathered) or why cpattn refuses it. The same on
    every rank (the ranks agree on it while the mask is built)."""

    causal: bool = True
    window: "tuple[int, int] | None" = None
    key_padding: torch.Tensor | None = None  # (B, S) bool, True = a real token, global order
    refused: str | None = None
    state: Any = field(default=None, repr=False)  # the DispatchState it was built under (for recomputations)


def cpattn_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None,
                local_size: int | None = None, allow_is_causal_skip: bool = True,
                allow_is_bidirectional_skip: bool = False, use_vmap: bool = False, device="cpu", config=None,
                **kwargs):
    """transformers' mask function for ``attn_implementation="cpattn"`` (its keyword arguments are those of
    `transformers.masking_utils.sdpa_mask`).

    One device: None where the layer's own flags say it all (plain causal or sliding-window masks without
    padding, queries and keys of one span), so that cpattn passes is_causal and the window to kernels that
    skip the work outside them; otherwise transformers' own boolean mask. Under a mesh: a `ShardedMask`."""
    pattern = _pattern_of(mask_function, local_size, use_vmap, device)
    cp = _sharding()
    whole_keys = bool(getattr(config, "is_encoder_decoder", False)) and not (pattern and pattern.causal)
    if cp is None or whole_keys:
        if (pattern is not None and pattern.causal and allow_is_causal_skip and q_length == kv_length
                and _is_zero(q_offset) and _is_zero(kv_offset)
                and (attention_mask is None or bool(attention_mask.all()))):
            return None
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         local_size=local_size, allow_is_causal_skip=allow_is_causal_skip,
                         allow_is_bidirectional_skip=allow_is_bidirectional_skip, use_vmap=use_vmap, device=device,
                         config=config, **kwargs)
    skip = allow_is_bidirectional_skip if pattern is not None and not pattern.causal else allow_is_causal_skip
    return _sharded_mask(cp, pattern if skip else None, attention_mask, batch_size, q_length, kv_length,
                         q_offset, kv_offset, device)


def _is_zero(offset) -> bool:
    return isinstance(offset, int) and offset == 0


def _pattern_of(mask_function, local_size: int | None, use_vmap: bool, device) -> _Pattern | None:
    """The plain pattern transformers' mask function draws, or None where it adds anything else. transformers
    turns vmap on exactly where it adds a caller's overlay (image tokens and the like), which depends on data,
    so those are never plain. Windowed functions are told apart (sliding vs chunked, causal vs not) by
    evaluating them where the candidates differ: around one, two and three windows."""
    if use_vmap:
        return None
    if mask_function is causal_mask_function:
        return _Pattern(True)
    if mask_function is bidirectional_mask_function:
        return _Pattern(False)
    if local_size is None:
        return None
    w = int(local_size)
    anchors = torch.tensor([0, 1, 2, w - 2, w - 1, w, w + 1, w + 2, 2 * w - 1, 2 * w, 2 * w + 1, 3 * w + 5])
    offsets = torch.tensor([-w - 2, -w - 1, -w, -w + 1, -w + 2, -(w // 2), -2, -1, 0, 1, 2, w // 2, w - 1, w, w + 1])
    q, kv = (anchors[:, None] + 0 * offsets[None, :]).flatten(), (anchors[:, None] + offsets[None, :]).flatten()
    q, kv = q[kv >= 0].to(device), kv[kv >= 0].to(device)
    try:
        seen = torch.as_tensor(mask_function(torch.zeros_like(q), torch.zeros_like(q), q, kv)).bool()
    except (RuntimeError, IndexError, TypeError):  # a function of data (documents, blocks): not a plain pattern
        return None
    for candidate in (_Pattern(True, (w - 1, 0)), _Pattern(False, (w, w))):
        if seen.shape == q.shape and torch.equal(seen, candidate.visible(q, kv)):
            return candidate
    return None


_REFUSED_PATTERN = 1
_REFUSED_CACHE = 2
_REFUSED_LENGTH = 3
_REFUSALS = {
    _REFUSED_PATTERN: (
        "transformers built this layer's mask with more than a causal, sliding-window or bidirectional pattern: "
        "packed sequences it read from one rank's position ids (under a mesh pass attention_mask, all ones where "
        "there is no padding, as shard_batch does: documents then come from the position ids cpattn gathers), "
        "or an overlay context parallelism does not shard (image tokens, blocks, chunked attention)"),
    _REFUSED_CACHE: (
        "this mask continues a KV cache: under a mesh every forward covers the whole (sharded) sequence from "
        "position 0: pass use_cache=False, or generate on one device"),
    _REFUSED_LENGTH: (
        "the 2-D attention_mask does not cover this rank's tokens: under a mesh pass this rank's shard of it "
        "(shard_batch does), or a 4-D (batch, 1, local tokens, all tokens) mask in global key order"),
}


def _sharded_mask(cp, pattern: _Pattern | None, attention_mask, batch_size: int, q_length: int, kv_length: int,
                  q_offset, kv_offset, device) -> ShardedMask:
    """The ranks agree on a refusal and on whether any holds padding (one small all-gather), then gather the
    padding: every rank returns the same kind of mask, so that every layer runs the same collectives on all."""
    if pattern is None:
        code = _REFUSED_PATTERN
    elif not (_is_zero(q_offset) and _is_zero(kv_offset)):
        code = _REFUSED_CACHE
    elif kv_length != q_length or (attention_mask is not None and attention_mask.shape[-1] != q_length):
        code = _REFUSED_LENGTH
    else:
        code = 0
    padded = attention_mask is not None and not bool(attention_mask.all())
    code, padded = _max_over_ranks(cp, [code, int(padded)], device)
    state = STATE_VAR.get()
    if code:
        return ShardedMask(refused=_REFUSALS[code], state=state)
    padding = None
    if padded:
        local = attention_mask if attention_mask is not None else torch.ones(batch_size, q_length, device=device)
        padding = _gather_tokens(local.to(torch.uint8), cp, 1).bool()  # uint8: gloo gathers no bool tensors
    return ShardedMask(pattern.causal, pattern.window, padding, state=state)


register()
