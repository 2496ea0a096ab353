"""The context-parallel front: choose a schedule, check every rank agrees, run the schedule.

Order of events in one call (every rank runs the same):
1. Choose the schedule and collect, locally, every reason the provider or schedule cannot take the call.
2. One small all-gather of an integer signature of the call (provider, schedule, dtype, heads, dims,
   flags, local length, whether this rank refused). Any disagreement, or any rank refusing, raises the
   same error on every rank, before any data moves. This wait is bounded (cp_timeout) on every backend.
3. Run ring, Ulysses, hybrid (Ulysses inside, ring across) or all-gather.
"""

from __future__ import annotations

import functools
import logging
import struct
import zlib
from dataclasses import dataclass, field

import torch

from ..contract import AttentionCall, Provider
from ..errors import InvalidArgumentError, RankMismatchError, UnsupportedInputError
from ..masks import is_mask_mod, materialize_mask_mod
from ..names import AttentionProvider
from .allgather import AllGatherSpec, allgather_attention
from .comm import DEFAULT_TIMEOUT, CommStats, gather_signatures
from .layout import LAYOUTS, local_len, local_positions, ring_positions
from .mesh import Group, Topology, topology_from_mesh
from .packed import VarlenKernel, packed_attention
from .prefix import prefix_allgather_attention, prefix_ring_attention
from .ring import RingSpec, ring_attention
from .ulysses import UlyssesSpec, head_chunks_for, ulysses_attention

log = logging.getLogger("cpattn")

STRATEGIES = ("auto", "ring", "ulysses", "hybrid", "allgather")
_PROVIDER_CODES = {p.value: i for i, p in enumerate(AttentionProvider)} | {"auto": len(AttentionProvider)}
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_MASK_CODES = {None: 0, "bool": 1, "additive": 2, "key_padding": 3, "key_padding_additive": 4, "mask_mod": 5}
_FIELDS = (
    "provider", "schedule", "layout", "dtype", "batch", "query heads", "key/value heads", "head dim",
    "value head dim", "is_causal", "mask kind", "mask dim 0", "mask dim 1", "mask dim 2 (rows)",
    "mask dim 3 (keys)", "dropout_p", "requires grad", "scale", "replicated prefix",
)


@dataclass
class ContextParallel:
    topology: Topology
    strategy: str = "auto"
    layout: str = "zigzag"
    timeout: float = DEFAULT_TIMEOUT
    stats: CommStats = field(default_factory=CommStats)
    prefix: int = 0  # replicated leading tokens (joint attention), see cpattn/cp/prefix.py
    bounded_waits: bool = False  # cp_timeout was given: every wait is a bounded host wait, on NCCL too
    ring_streams: int = 2  # CUDA streams the ring backward's steps take in turn (cpattn/cp/streams.py)

    @classmethod
    def from_mesh(cls, cp_mesh, cp_strategy: str = "auto", cp_layout: str = "zigzag", cp_timeout: float | None = None,
                  cp_replicated_prefix: int = 0, cp_ring_streams: int = 2):
        if cp_strategy not in STRATEGIES:
            raise InvalidArgumentError(f"cp_strategy={cp_strategy!r}; choose one of {STRATEGIES}")
        if cp_layout not in LAYOUTS:
            raise InvalidArgumentError(f"cp_layout={cp_layout!r}; choose one of {LAYOUTS}")
        timeout = DEFAULT_TIMEOUT if cp_timeout is None else float(cp_timeout)
        return cls(topology_from_mesh(cp_mesh, cp_strategy), cp_strategy, cp_layout, timeout,
                   prefix=int(cp_replicated_prefix), bounded_waits=cp_timeout is not None,
                   ring_streams=int(cp_ring_streams))

    @property
    def data_timeout(self) -> float | None:
        """What the schedules' transfers wait with: None (stream-ordered on NCCL) unless cp_timeout was given."""
        return self.timeout if self.bounded_waits else None

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    # -- step 1: schedule and local verdict ---------------------------------------------------
    def choose_strategy(self, provider: Provider, call: AttentionCall) -> str:
        if self.strategy != "auto":
            return self.strategy
        choice, why = self._auto(provider, call)
        log.debug("cpattn auto schedule: %s (%s)", choice, why)
        return choice

    def _auto(self, provider: Provider, call: AttentionCall) -> tuple[str, str]:
        if self.topology.mesh_dims == 2:
            return "hybrid", "2-D mesh"
        caps = provider.capabilities(call.device.type)
        if self.prefix:
            if caps is not None and caps.returns_lse and (caps.backward or not call.needs_grad):
                return "ring", "a replicated prefix runs on ring (prefix KV as a local block)"
            return "allgather", "a replicated prefix with a provider that cannot ring"
        if caps is not None and (not caps.returns_lse or (call.needs_grad and not caps.backward)):
            return "allgather", f"{provider.name} returns no LSE or has no LSE backward, so it cannot ring"
        if call.dropout_p > 0:
            return "ulysses", "dropout needs whole-sequence kernel calls"
        w = self.world_size
        if call.q_heads % w == 0 and call.kv_heads % w == 0:
            ratio = w * call.kv_heads / (call.q_heads + call.kv_heads)  # ring bytes / Ulysses bytes
            if ratio > 1:
                return "ulysses", f"heads divide by {w} and ring would move {ratio:.1f}x Ulysses' bytes"
        return "ring", "ring overlaps its transfers with compute"

    def reasons(self, provider: Provider, call: AttentionCall, strategy: str) -> list[str]:
        if call.q_len != call.kv_len:
            return [f"query length {call.q_len} != key length {call.kv_len}: context parallelism shards "
                    "self-attention (q, k, v of the same tokens)"]
        if self.prefix:
            prefix_reasons = self._prefix_reasons(call, strategy)
            if prefix_reasons:
                return prefix_reasons
        mask = call.attn_mask if isinstance(call.attn_mask, torch.Tensor) else None  # mask_mods: see run()
        if mask is not None and mask.requires_grad and torch.is_grad_enabled():
            return ["gradients with respect to attn_mask are not supported under context parallelism: pass "
                    "attn_mask.detach(), or run this call on one device with provider 'native'"]
        if mask is not None and mask.dim() >= 2 and mask.shape[-2] not in (1, call.q_len):
            return [f"attn_mask has {mask.shape[-2]} rows; under context parallelism it covers this rank's "
                    f"{call.q_len} local queries (or 1 row, broadcast) by all keys in global order"]
        if strategy in ("ring", "hybrid"):
            out = provider.reasons(call, need_lse=True, need_backward=True)
            if call.dropout_p > 0:
                out.append("dropout under ring attention is not supported (each block would need its own "
                           "reproducible RNG stream)")
        else:
            out = self._reasons_for_any_total(provider, call, strategy)
        ulysses_size = self.topology.ulysses_size if strategy == "hybrid" else self.world_size
        if strategy in ("ulysses", "hybrid") and call.q_heads < ulysses_size:
            out.append(f"Ulysses over {ulysses_size} ranks needs at least {ulysses_size} query heads, "
                       f"got {call.q_heads}")
        if strategy == "allgather" and (call.is_causal or call.attn_mask is not None):
            caps = provider.capabilities(call.device.type)
            takes = caps is not None and caps.bool_mask and (call.attn_mask is None or call.mask_kind in (
                "bool", "key_padding", "mask_mod") or caps.additive_mask)
            if not takes:
                out.append("all-gather expresses causal and masks as a positional attn_mask, which this "
                           "provider does not take")
        return out

    def _reasons_for_any_total(self, provider: Provider, call: AttentionCall, strategy: str) -> list[str]:
        """The provider's reasons before the ranks agree, when the total length (what the kernel gets under
        Ulysses, and as keys under all-gather without causality) is not known yet: the reasons it gives both for
        W times this shard and for one more token. A reason about lengths names them and so differs between the
        two: it is left to `kernel_reasons`, which checks the exact lengths after the agreement, the same on every
        rank; the rest (dtype, head dim, gradients, ...) stands. Checked on the shard as it is, sageattention 1.0.6
        under Ulysses was refused at 96 tokens per rank of 192, which its kernel takes. Calls with a mask, and
        2-D meshes, are checked on the shard."""
        if call.attn_mask is not None or self.topology.mesh_dims != 1 or not (
                strategy == "ulysses" or (strategy == "allgather" and not call.is_causal)):
            return provider.reasons(call)
        w, sharded = self.world_size, call.q_len - self.prefix
        verdicts = [[reason for shape in self._kernel_shapes(call, strategy, total, [sharded])
                     for reason in provider.reasons(_with_lengths(call, *shape))]
                    for total in (w * sharded, w * sharded + 1)]
        return [reason for reason in verdicts[0] if reason in verdicts[1]]

    def kernel_reasons(self, provider: Provider, call: AttentionCall, strategy: str, total: int) -> list[str]:
        """What the provider says of the calls its kernel will get, where their lengths are not the shard's:
        Ulysses attends over all `total` tokens, all-gather over all keys (and the prefix), ring over each rank's
        block (and the prefix block). `reasons` saw the shard only; a rule on lengths (sageattention 1.0.6's
        64-key blocks without causal) could pass there and fail here: a 28-token prefix and 100 tokens per rank
        make 128 keys on the shard and 228 in the kernel. The lengths come from the agreed `total`, so every
        rank reaches the same verdict with no further collective. Calls with a mask, causal ring and all-gather
        calls (whose blocks the shard check covers or whose causality becomes a mask) and 2-D meshes are left to
        `reasons`."""
        if call.attn_mask is not None or self.topology.mesh_dims != 1:
            return []
        w = self.world_size
        lengths = [n for n in (local_len(total, w, 1, r, 0, self.layout) for r in range(w)) if n]
        out = []
        for q_len, kv_len, causal in sorted(self._kernel_shapes(call, strategy, total, lengths)):
            for reason in provider.reasons(_with_lengths(call, q_len, kv_len, causal)):
                text = f"its kernel gets {q_len} queries x {kv_len} keys here: {reason}"
                if text not in out:
                    out.append(text)
        return out

    def _kernel_shapes(self, call: AttentionCall, strategy: str, total: int, lengths: list[int]) -> set:
        """(queries, keys, causal) of the calls `strategy`'s kernel gets, for shards of `lengths` tokens out of
        `total` (plus the replicated prefix): empty where the shard check covers them (causal ring and
        all-gather, and the hybrid)."""
        prefix = self.prefix
        if strategy == "ulysses":
            return {(total, total, call.is_causal)}
        if strategy == "allgather" and not call.is_causal:
            return {(n + prefix, total + prefix, False) for n in lengths}
        if strategy == "ring" and not call.is_causal:
            return {(n + prefix, m, False) for n in lengths for m in lengths + ([prefix] if prefix else [])}
        return set()

    def _prefix_reasons(self, call: AttentionCall, strategy: str) -> list[str]:
        out = []
        if strategy not in ("ring", "allgather"):
            out.append(f"cp_replicated_prefix runs with cp_strategy 'ring' or 'allgather', not '{strategy}'")
        if call.is_causal or call.attn_mask is not None:
            out.append("cp_replicated_prefix (joint attention) takes no is_causal and no attn_mask")
        if call.q_len < self.prefix:
            out.append(f"this rank holds {call.q_len} tokens, fewer than cp_replicated_prefix={self.prefix}")
        return out

    def _suggestion(self, strategy: str) -> str:
        return {
            "ring": "cp_strategy='ulysses' or 'allgather', or a provider that returns an LSE and has a backward "
                    "(e.g. 'flash', '_native_cudnn', '_native_flash', 'native')",
            "hybrid": "a provider that returns an LSE and has a backward (e.g. 'flash', '_native_cudnn', 'native')",
            "ulysses": "cp_strategy='ring', or another provider",
            "allgather": "cp_strategy='ring' with a provider that returns an LSE, or a provider that takes masks",
        }[strategy]

    # -- step 2: agreement --------------------------------------------------------------------
    def _signature(self, provider: Provider, call: AttentionCall, strategy: str, refused: bool) -> list[int]:
        mask = call.attn_mask
        dims = [0, 0, 0, 0]
        kind = None
        if is_mask_mod(mask):  # materialized after the check as (local rows x all keys): one row per query
            dims, kind = [0, 0, 2, 0], "mask_mod"
        elif mask is not None:
            dims = [0] * (4 - mask.dim()) + list(mask.shape)
            # rows: 1 = broadcast over queries, 2 = one row per local query (checked in reasons); a rank holding
            # one query cannot tell them apart (-1, matches either). For the same reason the kind compared is
            # bool or additive only: "key padding" (one row) would differ between such a rank and the others.
            rows = mask.shape[-2] if mask.dim() >= 2 else 1
            dims[2] = -1 if call.q_len == 1 else (1 if rows == 1 else 2)
            kind = "bool" if mask.dtype == torch.bool else "additive"
        bits = lambda x: struct.unpack("<q", struct.pack("<d", float(x)))[0]  # noqa: E731
        return [
            _PROVIDER_CODES[provider.name], STRATEGIES.index(strategy), LAYOUTS.index(self.layout),
            _DTYPE_CODES.get(call.dtype, 0), call.batch, call.q_heads, call.kv_heads, call.head_dim,
            call.value_dim, int(call.is_causal), _MASK_CODES[kind], *dims, bits(call.dropout_p),
            int(call.needs_grad), bits(call.scale), self.prefix,
            # not compared field by field:
            int(refused), max(call.q_len - self.prefix, 0),
        ]

    def _agree(self, group: Group, sig: list[int], device) -> torch.Tensor:
        table = gather_signatures(sig, group, self.timeout, device)
        n = len(_FIELDS)
        for i, name in enumerate(_FIELDS):
            column = table[:, i].tolist()
            if name == "mask dim 2 (rows)":
                known = {x for x in column if x != -1}
                self._mask_rows = known.pop() if len(known) == 1 else (2 if not known else None)
                if len(known) <= 1:
                    continue
            if len(set(column)) > 1:
                raise RankMismatchError(
                    f"ranks of the context-parallel group disagree on {name}: "
                    + ", ".join(f"rank {r}: {_show(name, x)}" for r, x in enumerate(column))
                    + ". Every rank must make the same attention call on its own shard."
                )
        refused = [r for r, x in enumerate(table[:, n].tolist()) if x]
        if refused:
            self._refused_ranks = refused
        return table[:, n + 1]

    def agree(self, provider, call, strategy, refused: bool) -> int:
        """Check all ranks agree; return the global sequence length. Same error on every rank if not."""
        self._refused_ranks = []
        sig = self._signature(provider, call, strategy, refused)
        topo = self.topology
        if topo.mesh_dims == 2:
            u_lengths = self._agree(topo.ulysses, sig, call.device).tolist()
            mask_rows = self._mask_rows  # what the Ulysses stage gathers
            sig[len(_FIELDS) + 1] = sum(u_lengths)  # the ring stage compares ring-shard lengths
            r_lengths = self._agree(topo.ring, sig, call.device).tolist()
            total = sum(r_lengths)
            self._check_lengths(u_lengths, [local_len(total, topo.ring_size, topo.ulysses_size, topo.ring_rank, u,
                                                      self.layout) for u in range(topo.ulysses_size)], total)
            expected = [sum(local_len(total, topo.ring_size, topo.ulysses_size, r, u, self.layout)
                            for u in range(topo.ulysses_size)) for r in range(topo.ring_size)]
            self._check_lengths(r_lengths, expected, total)
            self._mask_rows = mask_rows
        else:
            lengths = self._agree(topo.ring, sig, call.device).tolist()
            total = sum(lengths)
            self._check_lengths(lengths, [local_len(total, topo.ring_size, 1, r, 0, self.layout)
                                          for r in range(topo.ring_size)], total)
        if self._refused_ranks and not refused:
            raise UnsupportedInputError(
                f"context-parallel attention (provider '{provider.name}', cp_strategy='{strategy}')",
                [f"rank(s) {self._refused_ranks} refused this call; their error lists the reasons"],
            )
        self._check_mask(call, total)
        return total

    def _check_lengths(self, have: list[int], want: list[int], total: int) -> None:
        if have != want:
            raise RankMismatchError(
                f"local sequence lengths {have} do not match the '{self.layout}' layout of {total} tokens over "
                f"{self.world_size} ranks, which gives {want}. Shard inputs with cpattn.shard_sequence(x, "
                f"cp_mesh, seq_dim, layout='{self.layout}') (the same layout as cp_layout)."
            )

    @staticmethod
    def _check_mask(call: AttentionCall, total: int) -> None:
        mask = call.attn_mask
        if mask is None or is_mask_mod(mask):
            return
        if mask.shape[-1] not in (1, total):
            raise InvalidArgumentError(
                f"under context parallelism attn_mask must be (local query rows x all keys): {total} keys "
                f"(or 1) in global order; got shape {tuple(mask.shape)}"
            )

    # -- step 3: run --------------------------------------------------------------------------
    def run(self, provider: Provider, call: AttentionCall) -> torch.Tensor:
        strategy = self.choose_strategy(provider, call)
        reasons = self.reasons(provider, call, strategy)
        total = self.agree(provider, call, strategy, refused=bool(reasons))
        reasons = reasons or self.kernel_reasons(provider, call, strategy, total)
        if reasons:
            raise UnsupportedInputError(
                f"provider '{provider.name}' under cp_strategy='{strategy}'", reasons, self._suggestion(strategy)
            )
        self.stats["calls"] += 1
        if is_mask_mod(call.attn_mask) and (strategy != "ring" or self.prefix):
            # The plain ring evaluates a mask_mod per KV block (local rows x that block's keys); the others
            # slice one (local rows x all keys) mask.
            call = call.replace(attn_mask=self._materialize(call, total))
        if self.prefix and strategy == "ring":
            return prefix_ring_attention(provider, call, self._ring_spec(total), self.prefix)
        if self.prefix:
            return prefix_allgather_attention(provider, call, self._allgather_spec(total, call.device), self.prefix)
        if strategy == "ring":
            return ring_attention(provider, call, self._ring_spec(total))
        if strategy == "hybrid":
            inner = functools.partial(ring_attention, provider, spec=self._ring_spec(total))
            return ulysses_attention(call, self._hybrid_ulysses_spec(total), inner)
        if strategy == "ulysses":
            return ulysses_attention(call, self._ulysses_spec(total, call), provider.attention)
        return allgather_attention(provider, call, self._allgather_spec(total, call.device))

    def run_packed(self, provider: Provider, call: AttentionCall, kernel: VarlenKernel, bounds: list[int]):
        """Packed sequences with global document boundaries `bounds` (see cp/packed.py). `call` holds
        (1, H, S_local, D) views of the packed local q, k, v; all-gather on a 1-D mesh."""
        reasons = provider.reasons(call) + self._packed_reasons()
        total = self.agree(provider, call, "allgather", refused=bool(reasons))
        if reasons:
            raise UnsupportedInputError(f"packed sequences on provider '{provider.name}' under context "
                                        "parallelism", reasons)
        self._agree_documents(bounds, call.device)
        if bounds[-1] != total:
            raise InvalidArgumentError(
                f"cu_seqlens end at {bounds[-1]} tokens but the ranks hold {total} together: under context "
                "parallelism cu_seqlens are the boundaries of the whole packed stream, not of this rank's shard"
            )
        self.stats["calls"] += 1
        return packed_attention(kernel, call, bounds, self._allgather_spec(total, call.device))

    def _packed_reasons(self) -> list[str]:
        out = []
        if self.topology.mesh_dims != 1:
            out.append("packed sequences under context parallelism run all-gather on a 1-D cp_mesh; a 2-D mesh "
                       "runs the hybrid schedule, which has no packed form")
        if self.strategy not in ("auto", "allgather"):
            out.append(f"packed sequences under context parallelism run all-gather, not cp_strategy="
                       f"'{self.strategy}': pass cp_strategy='allgather' or 'auto', or use "
                       "attention_dispatch with cpattn.document_mask(...) for ring or Ulysses")
        if self.prefix:
            out.append("cp_replicated_prefix has no packed form: put the shared tokens in a document of their own")
        return out

    def _agree_documents(self, bounds: list[int], device) -> None:
        digest = zlib.crc32(struct.pack(f"<{len(bounds)}q", *bounds))
        table = gather_signatures([len(bounds), digest], self.topology.ring, self.timeout, device)
        if len({tuple(row) for row in table.tolist()}) > 1:
            raise RankMismatchError(
                "ranks of the context-parallel group pass different cu_seqlens (number of boundaries per rank: "
                f"{table[:, 0].tolist()}): every rank must pass the boundaries of the whole packed stream"
            )

    def _materialize(self, call: AttentionCall, total: int) -> torch.Tensor:
        """A mask_mod as this rank's (local query rows x all keys) bool mask, in global positions: the form
        every schedule slices (costs S_local x S bools, like a tensor mask of the same kind)."""
        t = self.topology
        rows = local_positions(total, t.ring_size, t.ulysses_size, t.ring_rank, t.ulysses_rank, self.layout,
                               call.device)
        return materialize_mask_mod(call.attn_mask, call.batch, call.q_heads, rows,
                                    torch.arange(total, device=call.device))

    def _ring_spec(self, total: int) -> RingSpec:
        return RingSpec(self.topology.ring, self.layout, total, self.data_timeout, self.stats,
                        step_streams=self.ring_streams)

    def _gathered_order(self, total: int, device) -> tuple[torch.Tensor | None, torch.Tensor]:
        """1-D schedules that gather every rank's tokens: their concatenation's global positions."""
        positions = _positions_cached(total, self.topology.ring_size, self.layout, device)
        if bool((positions[1:] >= positions[:-1]).all()):
            return None, positions
        return torch.argsort(positions), positions

    def _ulysses_spec(self, total: int, call: AttentionCall) -> UlyssesSpec:
        group = self.topology.ring
        lengths = [local_len(total, group.size, 1, r, 0, self.layout) for r in range(group.size)]
        order, positions = self._gathered_order(total, call.device)
        return UlyssesSpec(group, lengths, self.data_timeout, self.stats, order, positions, self._mask_rows == 2,
                           head_chunks_for(call, total, group.size))

    def _hybrid_ulysses_spec(self, total: int) -> UlyssesSpec:
        topo = self.topology
        lengths = [local_len(total, topo.ring_size, topo.ulysses_size, topo.ring_rank, u, self.layout)
                   for u in range(topo.ulysses_size)]
        # one head chunk: each chunk would run the whole inner ring again
        return UlyssesSpec(topo.ulysses, lengths, self.data_timeout, self.stats,
                           mask_per_query=self._mask_rows == 2)

    def _allgather_spec(self, total: int, device) -> AllGatherSpec:
        group = self.topology.ring
        lengths = [local_len(total, group.size, 1, r, 0, self.layout) for r in range(group.size)]
        order, positions = self._gathered_order(total, device)
        if order is None:
            order = torch.arange(total, device=device)
        q_positions = ring_positions(total, group.size, group.rank, self.layout, device)
        return AllGatherSpec(group, lengths, q_positions, order, positions, self.data_timeout, self.stats)


@functools.lru_cache(maxsize=256)
def _positions_cached(total: int, ring_size: int, layout: str, device) -> torch.Tensor:
    return torch.cat([ring_positions(total, ring_size, r, layout, device) for r in range(ring_size)])


def _show(name: str, code: int):
    if name == "provider":
        return list(_PROVIDER_CODES)[code]
    if name == "schedule":
        return STRATEGIES[code]
    if name == "dtype":
        return {v: str(k).replace("torch.", "") for k, v in _DTYPE_CODES.items()}.get(code, code)
    if name == "layout":
        return LAYOUTS[code]
    if name == "mask kind":
        return {v: k or "none" for k, v in _MASK_CODES.items()}.get(code, code)
    if name in ("scale", "dropout_p"):
        return struct.unpack("<d", struct.pack("<q", code))[0]
    return code


def _with_lengths(call: AttentionCall, q_len: int, kv_len: int, causal: bool) -> AttentionCall:
    """`call` with q_len queries and kv_len keys, for the providers' checks only: views of every row repeated
    (zero strides; the checks read shapes, dtypes and flags, never these values)."""
    def view(x: torch.Tensor, length: int) -> torch.Tensor:
        base = x if x.numel() else x.new_empty(x.shape[-1]).requires_grad_(x.requires_grad)
        return base.as_strided(x.shape[:2] + (length, x.shape[3]), (0, 0, 0, 1))
    return call.replace(query=view(call.query, q_len), key=view(call.key, kv_len), value=view(call.value, kv_len),
                        is_causal=causal)
