"""The agreement check that opens every context-parallel call: every rank must make the same call on its shard.

Each rank packs the call into a signature of integers (provider, schedule, layout, dtype, heads, dims, flags, mask,
scale, prefix, suffix, window, softcap, sinks, whether key/value are replicated and then their length; then whether it
refused and its local length) and one small all-gather gives every rank every
rank's signature. Every rank reads the same table, so every rank takes the same path: the same RankMismatchError
on a field that differs, the same UnsupportedInputError where another rank refused, else the global length.
Nothing has moved yet, and the wait is bounded (cp_timeout) on every backend.

The provider is compared by a checksum of its name, so this module needs no list of providers; when the checksums
differ, the ranks gather their names for the message (one more collective, which every rank enters since every
rank saw the difference).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import torch

from ..contract import AttentionCall, Provider
from ..errors import InvalidArgumentError, RankMismatchError, UnsupportedInputError
from ..masks import is_mask_mod
from .comm import gather_signatures
from .cross import kv_replicated
from .layout import LAYOUTS, local_len
from .mesh import Group
from .registry import STRATEGIES
from .schedule import Agreed, Setup

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_MASK_CODES = {None: 0, "bool": 1, "additive": 2, "key_padding": 3, "key_padding_additive": 4, "mask_mod": 5}
FIELDS = (
    "provider", "schedule", "layout", "dtype", "batch", "query heads", "key/value heads", "head dim",
    "value head dim", "is_causal", "mask kind", "mask dim 0", "mask dim 1", "mask dim 2 (rows)",
    "mask dim 3 (keys)", "dropout_p", "requires grad", "scale", "replicated prefix",
    "replicated suffix",
    "window left", "window right", "softcap", "sinks (heads)", "key/value replicated",
    "key length (replicated key/value)",
)
_NO_WINDOW, _UNBOUNDED = -2, -1  # window side codes: no window at all; a side of None
_ROWS = FIELDS.index("mask dim 2 (rows)")
_REFUSED = len(FIELDS)  # after the compared fields: whether the rank refused, then its local length
_LENGTH = len(FIELDS) + 1
_ANY_ROWS = -1  # a rank holding one query: its mask's rows match one row for all and one per query alike
_ROW_PER_QUERY = 2


@dataclass(frozen=True)
class _Stage:
    """What one group's table says, once its fields agree."""

    lengths: list[int]  # every rank's local length
    mask_rows: int  # 0: no mask, 1: one row for all queries, 2: a row per query
    refused: list[int]  # group ranks that refused the call


def provider_code(provider: Provider) -> int:
    """A checksum of the provider's name: equal on ranks that run the same provider."""
    return zlib.crc32(provider.name.encode())


def signature(cp: Setup, provider: Provider, call: AttentionCall, schedule: str, refused: bool) -> list[int]:
    """This rank's call as integers: the compared fields (FIELDS), then whether it refused and its local length."""
    dims, kind = _mask_dims(call)
    replicated = kv_replicated(call)
    return [
        provider_code(provider), STRATEGIES.index(schedule), LAYOUTS.index(cp.layout),
        _DTYPE_CODES.get(call.dtype, 0), call.batch, call.q_heads, call.kv_heads, call.head_dim,
        call.value_dim, int(call.is_causal), _MASK_CODES[kind], *dims, _float_bits(call.dropout_p),
        int(call.needs_grad), _float_bits(call.scale), cp.prefix, cp.suffix,
        *_window_codes(call.window), 0 if call.softcap is None else _float_bits(call.softcap),
        -1 if call.sinks is None else call.sinks.numel(), int(replicated), call.kv_len if replicated else 0,
        int(refused), max(call.q_len - cp.replicated, 0),
    ]


def _window_codes(window) -> list[int]:
    if window is None:
        return [_NO_WINDOW, _NO_WINDOW]
    return [_UNBOUNDED if side is None else side for side in window]


def _mask_dims(call: AttentionCall) -> tuple[list[int], str | None]:
    """The mask's four dims as compared, and its kind. Rows are 1 (broadcast over queries) or 2 (one per local
    query, as `reasons` checked), since ranks hold different numbers of queries; a rank holding one query cannot
    tell them apart (_ANY_ROWS, matches either). For the same reason the kind compared is bool or additive only:
    "key padding" (one row) would differ between such a rank and the others."""
    mask = call.attn_mask
    if mask is None:
        return [0, 0, 0, 0], None
    if is_mask_mod(mask):  # made (local rows x all keys) after the check: one row per query
        return [0, 0, _ROW_PER_QUERY, 0], "mask_mod"
    dims = [0] * (4 - mask.dim()) + list(mask.shape)
    rows = mask.shape[-2] if mask.dim() >= 2 else 1
    dims[2] = _ANY_ROWS if call.q_len == 1 else (1 if rows == 1 else _ROW_PER_QUERY)
    return dims, "bool" if mask.dtype == torch.bool else "additive"


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _float_of_bits(code: int) -> float:
    return struct.unpack("<d", struct.pack("<q", code))[0]


def agree(cp: Setup, provider: Provider, call: AttentionCall, schedule: str, refused: bool) -> Agreed:
    """Check every rank agrees; return what they agreed on. The same error on every rank if they do not."""
    sig = signature(cp, provider, call, schedule, refused)
    if cp.topology.mesh_dims == 2:
        total, mask_rows, refused_ranks = _agree_two_stages(cp, provider, sig, call.device)
    else:
        stage = _agree_stage(cp, provider, cp.topology.ring, sig, call.device)
        total = sum(stage.lengths)
        topo = cp.topology
        _check_lengths(cp, stage.lengths, [local_len(total, topo.ring_size, 1, r, 0, cp.layout)
                                           for r in range(topo.ring_size)], total)
        mask_rows, refused_ranks = stage.mask_rows, stage.refused
    if refused_ranks and not refused:
        raise UnsupportedInputError(
            f"context-parallel attention (provider '{provider.name}', cp_strategy='{schedule}')",
            [f"rank(s) {refused_ranks} refused this call; their error lists the reasons"],
        )
    if not kv_replicated(call):  # cross-attention masks cover the replicated keys (cross.py checked them)
        check_mask_keys(call, total)
    return Agreed(total, mask_rows == _ROW_PER_QUERY)


def _agree_two_stages(cp: Setup, provider: Provider, sig: list[int], device) -> tuple[int, int, list[int]]:
    """A 2-D mesh: the Ulysses group first (its ranks' lengths make one ring shard), then the ring group on the
    ring shards' lengths. The mask rows are the Ulysses stage's: that is the stage that gathers them."""
    topo = cp.topology
    inner = _agree_stage(cp, provider, topo.ulysses, sig, device)
    sig = list(sig)
    sig[_LENGTH] = sum(inner.lengths)
    outer = _agree_stage(cp, provider, topo.ring, sig, device)
    total = sum(outer.lengths)
    _check_lengths(cp, inner.lengths, [local_len(total, topo.ring_size, topo.ulysses_size, topo.ring_rank, u,
                                                 cp.layout) for u in range(topo.ulysses_size)], total)
    expected = [sum(local_len(total, topo.ring_size, topo.ulysses_size, r, u, cp.layout)
                    for u in range(topo.ulysses_size)) for r in range(topo.ring_size)]
    _check_lengths(cp, outer.lengths, expected, total)
    return total, inner.mask_rows, outer.refused or inner.refused


def _agree_stage(cp: Setup, provider: Provider, group: Group, sig: list[int], device) -> _Stage:
    table = gather_signatures(sig, group, cp.timeout, device)
    mask_rows = 0
    for i, name in enumerate(FIELDS):
        column = table[:, i].tolist()
        if i == _ROWS:
            known = {x for x in column if x != _ANY_ROWS}
            if len(known) <= 1:
                mask_rows = known.pop() if known else _ROW_PER_QUERY
                continue
        if len(set(column)) > 1:
            shown = (gather_names(provider.name, group, cp.timeout, device) if name == "provider"
                     else [_show(name, x) for x in column])
            raise RankMismatchError(
                f"ranks of the context-parallel group disagree on {name}: "
                + ", ".join(f"rank {r}: {x}" for r, x in enumerate(shown))
                + ". Every rank must make the same attention call on its own shard." + _HINTS.get(name, "")
            )
    refused = [r for r, x in enumerate(table[:, _REFUSED].tolist()) if x]
    return _Stage(table[:, _LENGTH].tolist(), mask_rows, refused)


def gather_names(name: str, group: Group, timeout: float, device) -> list[str]:
    """Every rank's `name` (two small all-gathers: the lengths, then the bytes padded to the longest)."""
    data = list(name.encode())
    lengths = gather_signatures([len(data)], group, timeout, device)[:, 0].tolist()
    padded = data + [0] * (max(max(lengths), 1) - len(data))
    table = gather_signatures(padded, group, timeout, device).tolist()
    return [bytes(row[:n]).decode(errors="replace") for row, n in zip(table, lengths)]


_HINTS = {
    "key/value replicated": (
        " Cross-attention (key/value whole on every rank) is implied where the key length differs from the local "
        "query length: a rank whose query shard is as long as the keys cannot tell, so pass kv_replicated=True "
        "on every rank."),
    "key length (replicated key/value)": " Cross-attention needs the same whole key/value on every rank.",
}


def _show(name: str, code: int):
    if name in ("window left", "window right"):
        return {_NO_WINDOW: "no window", _UNBOUNDED: "None"}.get(code, code)
    if name == "softcap":
        return "None" if code == 0 else _float_of_bits(code)
    if name == "sinks (heads)":
        return "None" if code < 0 else code
    if name == "schedule":
        return STRATEGIES[code]
    if name == "dtype":
        return {v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()}.get(code, code)
    if name == "layout":
        return LAYOUTS[code]
    if name == "mask kind":
        return {v: k or "none" for k, v in _MASK_CODES.items()}.get(code, code)
    if name in ("scale", "dropout_p"):
        return _float_of_bits(code)
    return code


def _check_lengths(cp: Setup, have: list[int], want: list[int], total: int) -> None:
    if have != want:
        raise RankMismatchError(
            f"local sequence lengths {have} do not match the '{cp.layout}' layout of {total} tokens over "
            f"{cp.world_size} ranks, which gives {want}. Shard inputs with cpattn.shard_sequence(x, "
            f"cp_mesh, seq_dim, layout='{cp.layout}') (the same layout as cp_layout)."
        )


def check_mask_keys(call: AttentionCall, total: int) -> None:
    """A tensor mask covers this rank's query rows by all `total` keys in global order (or 1, broadcast)."""
    mask = call.attn_mask
    if mask is None or is_mask_mod(mask):
        return
    if mask.shape[-1] not in (1, total):
        raise InvalidArgumentError(
            f"under context parallelism attn_mask must be (local query rows x all keys): {total} keys "
            f"(or 1) in global order; got shape {tuple(mask.shape)}"
        )


def agree_documents(cp: Setup, bounds: list[int], device) -> None:
    """Packed sequences: every rank passes the same global document boundaries (compared by a checksum)."""
    digest = zlib.crc32(struct.pack(f"<{len(bounds)}q", *bounds))
    table = gather_signatures([len(bounds), digest], cp.topology.ring, cp.timeout, device)
    if len({tuple(row) for row in table.tolist()}) > 1:
        raise RankMismatchError(
            "ranks of the context-parallel group pass different cu_seqlens (number of boundaries per rank: "
            f"{table[:, 0].tolist()}): every rank must pass the boundaries of the whole packed stream"
        )
