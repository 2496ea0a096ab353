"""The context-parallel front: choose a schedule, check every rank agrees, run the schedule.

Order of events in one call (every rank runs the same):
1. Choose the schedule (registry.py; `auto` asks them in turn) and collect, locally, every reason the call, the
   provider or the schedule refuses it for.
2. The agreement check (agreement.py): one small all-gather of an integer signature of the call. Any
   disagreement, or any rank refusing, raises the same error on every rank, before any data moves. Then the
   provider's verdict on the exact lengths the schedule's kernels get (kernel_checks.py), the same on every rank.
3. Run the schedule; or, for cross-attention (key/value whole on every rank, cp/cross.py), every schedule alike:
   one local call per rank, no key/value traffic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..contract import AttentionCall, Provider
from ..errors import InvalidArgumentError, UnsupportedInputError
from ..masks import is_mask_mod, materialize_mask_mod
from .agreement import agree
from .comm import DEFAULT_TIMEOUT, CommStats
from .cross import cross_attention, cross_faults, cross_reasons, kv_replicated
from .kernel_checks import kernel_reasons
from .layout import LAYOUTS, local_positions
from .mesh import Topology, topology_from_mesh
from .packed import GatheredKernel, run_packed
from .prefix import replicated_reasons
from .registry import AUTO_CANDIDATES, PREFIX_SCHEDULES, SCHEDULES, STRATEGIES, schedules_for
from .schedule import Schedule, Suggest, with_example
from .ulysses import head_chunks_for

log = logging.getLogger("cpattn")


@dataclass
class ContextParallel:
    topology: Topology
    strategy: str = "auto"
    layout: str = "zigzag"
    timeout: float = DEFAULT_TIMEOUT
    stats: CommStats = field(default_factory=CommStats)
    prefix: int = 0  # replicated leading tokens (joint attention), see cpattn/cp/prefix.py
    suffix: int = 0  # replicated trailing tokens (joint attention with the text last), likewise
    bounded_waits: bool = False  # cp_timeout was given: every wait is a bounded host wait, on NCCL too
    ring_streams: int = 2  # CUDA streams the ring backward's steps take in turn (cpattn/cp/streams.py)

    @classmethod
    def from_mesh(cls, cp_mesh, cp_strategy: str = "auto", cp_layout: str = "zigzag", cp_timeout: float | None = None,
                  cp_replicated_prefix: int = 0, cp_replicated_suffix: int = 0, cp_ring_streams: int = 2):
        if cp_strategy not in STRATEGIES:
            raise InvalidArgumentError(f"cp_strategy={cp_strategy!r}; choose one of {STRATEGIES}")
        if cp_layout not in LAYOUTS:
            raise InvalidArgumentError(f"cp_layout={cp_layout!r}; choose one of {LAYOUTS}")
        topology = topology_from_mesh(cp_mesh)
        _check_mesh_fits(cp_strategy, topology)
        timeout = DEFAULT_TIMEOUT if cp_timeout is None else float(cp_timeout)
        return cls(topology, cp_strategy, cp_layout, timeout, prefix=int(cp_replicated_prefix),
                   suffix=int(cp_replicated_suffix), bounded_waits=cp_timeout is not None, ring_streams=int(cp_ring_streams))

    @property
    def data_timeout(self) -> float | None:
        """What the schedules' transfers wait with: None (stream-ordered on NCCL) unless cp_timeout was given."""
        return self.timeout if self.bounded_waits else None

    @property
    def world_size(self) -> int:
        return self.topology.world_size

    @property
    def replicated(self) -> int:
        """Tokens of every call that every rank holds whole: the replicated prefix and suffix."""
        return self.prefix + self.suffix

    def head_chunks(self, call: AttentionCall, total: int) -> int:
        """How many head chunks a 1-D Ulysses call pipelines: `head_chunks_for`, by this module's name for it, so
        that a check can run the pipelined path on shapes too small for it to be chosen."""
        return head_chunks_for(call, total, self.world_size)

    # -- step 1: schedule and local verdict ---------------------------------------------------
    def choose(self, provider: Provider, call: AttentionCall) -> Schedule:
        """The schedule cp_strategy names, or the one `auto` picks for this call."""
        if self.strategy != "auto":
            return SCHEDULES[self.strategy]
        for schedule in AUTO_CANDIDATES[self.topology.mesh_dims]:
            why = schedule.auto(self, provider, call)
            if why is not None:
                log.debug("cpattn auto schedule: %s (%s)", schedule.name, why)
                return schedule
        raise AssertionError(f"no schedule answered auto on a {self.topology.mesh_dims}-D mesh")  # one always does

    def reasons(self, provider: Provider, call: AttentionCall, schedule: Schedule) -> list[str]:
        """Every reason, from this rank's shard, that `schedule` cannot run `call` with `provider`; the
        call's own faults first, alone, since they make the schedule's reasons moot. Cross-attention (key/value
        replicated) runs locally whatever the schedule (cp/cross.py): the provider's reasons for that call."""
        if kv_replicated(call):
            return cross_faults(call, self.replicated) or cross_reasons(provider, call)
        faults = self._call_faults(call, schedule)
        return faults or schedule.reasons(self, provider, call)

    def _call_faults(self, call: AttentionCall, schedule: Schedule) -> list[str]:
        if self.replicated:
            faults = replicated_reasons(call, self.prefix, self.suffix, schedule.name, PREFIX_SCHEDULES)
            if faults:
                return faults
        mask = call.attn_mask if isinstance(call.attn_mask, torch.Tensor) else None  # mask_mods: see run()
        if mask is not None and mask.requires_grad and torch.is_grad_enabled():
            return ["gradients with respect to attn_mask are not supported under context parallelism: pass "
                    "attn_mask.detach(), or run this call on one device with a provider that has gradients for "
                    "attn_mask"]
        if mask is not None and mask.dim() >= 2 and mask.shape[-2] not in (1, call.q_len):
            return [f"attn_mask has {mask.shape[-2]} rows; under context parallelism it covers this rank's "
                    f"{call.q_len} local queries (or 1 row, broadcast) by all keys in global order"]
        return []

    # -- steps 2 and 3: agreement, run --------------------------------------------------------
    def run(self, provider: Provider, call: AttentionCall, suggest: Suggest | None = None) -> torch.Tensor:
        """This rank's attention output. `suggest(call, exclude, **need)`, where given, names a provider to
        append to a refusal's suggestion."""
        schedule = self.choose(provider, call)
        reasons = self.reasons(provider, call, schedule)
        agreed = agree(self, provider, call, schedule.name, refused=bool(reasons))
        if kv_replicated(call):
            if reasons:
                raise UnsupportedInputError(f"provider '{provider.name}' for cross-attention under context "
                                            "parallelism", reasons,
                                            _cross_suggestion(provider, call, self.replicated, suggest))
            self.stats["calls"] += 1
            return cross_attention(self, provider, call, agreed.total)
        reasons = reasons or kernel_reasons(self, schedule, provider, call, agreed.total)
        if reasons:
            raise UnsupportedInputError(f"provider '{provider.name}' under cp_strategy='{schedule.name}'", reasons,
                                        schedule.suggestion(provider, call, suggest))
        self.stats["calls"] += 1
        if is_mask_mod(call.attn_mask) and not schedule.mask_mod_per_block:
            call = call.replace(attn_mask=self._materialize(call, agreed.total))
        return schedule.run(self, provider, call, agreed)

    def run_packed(self, provider: Provider, call: AttentionCall, kernel: GatheredKernel, bounds: list[int],
                   position_ids=None):
        """Packed sequences with global document boundaries `bounds` (see cp/packed.py). `call` holds
        (1, H, S_local, D) views of the packed local q, k, v; all-gather on a 1-D mesh; `position_ids` (or None)
        the local tokens' positions within their documents, checked against the layout."""
        return run_packed(self, provider, call, kernel, bounds, position_ids)

    def _materialize(self, call: AttentionCall, total: int) -> torch.Tensor:
        """A mask_mod as this rank's (local query rows x all keys) bool mask, in global positions: the form
        every schedule slices (costs S_local x S bools, like a tensor mask of the same kind)."""
        t = self.topology
        rows = local_positions(total, t.ring_size, t.ulysses_size, t.ring_rank, t.ulysses_rank, self.layout,
                               call.device)
        return materialize_mask_mod(call.attn_mask, call.batch, call.q_heads, rows,
                                    torch.arange(total, device=call.device))


def _cross_suggestion(provider: Provider, call: AttentionCall, replicated: int, suggest: Suggest | None) -> str:
    """What to do about a refused cross-attention call: what its reasons say where the call itself cannot be so,
    else another provider (each rank makes one ordinary call)."""
    if cross_faults(call, replicated):
        return "change the call as the reasons above say"
    return with_example("a provider that takes this call on one device (cross-attention makes one local call per "
                        "rank)", suggest(call, provider.name) if suggest else None)


def _check_mesh_fits(strategy: str, topology: Topology) -> None:
    """cp_strategy names a schedule of the mesh's shape."""
    if strategy == "auto" or SCHEDULES[strategy].mesh_dims == topology.mesh_dims:
        return
    if topology.mesh_dims == 2:
        names = " or ".join(f"'{name}'" for name in schedules_for(2))
        raise InvalidArgumentError(
            f"cp_strategy={strategy!r} runs on a 1-D mesh; a 2-D ('ring', 'ulysses') mesh runs {names}"
        )
    raise InvalidArgumentError(
        f"cp_strategy={strategy!r} needs a 2-D DeviceMesh with mesh_dim_names ('ring', 'ulysses')"
    )
