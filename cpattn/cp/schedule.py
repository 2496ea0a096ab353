"""What a context-parallel schedule is: the `Schedule` protocol, and what every schedule is given.

A schedule is one object in one file under cp/, registered by one line in registry.py. It answers, for one call:
whether `auto` would pick it, every reason it refuses the call, the lengths its kernel calls get where they are
not the shard's (so the provider can be asked about those lengths once the ranks agree on the total), what to
use instead when it refuses, and finally the attention output of this rank's queries.

Schedules see the group only through `Setup` (the ContextParallel that runs them) and the call's agreed facts
through `Agreed`; they never name a provider: a refusal says in words what a provider would need, and the
caller may append a concrete provider (`Suggest`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..contract import AttentionCall, Provider
from .comm import CommStats
from .mesh import Topology

# suggest(call, exclude, **need) -> "provider '<name>'" or None: a provider, other than `exclude`, that takes
# `call` (with `need`, e.g. need_lse=True); used in error messages only.
Suggest = Callable[..., "str | None"]

# (query rows, keys, causal) of one kernel call
KernelShape = tuple[int, int, bool]


class Setup(Protocol):
    """The group and options a schedule runs with (ContextParallel provides them)."""

    topology: Topology
    strategy: str  # cp_strategy as given: "auto" or a schedule's name
    layout: str
    prefix: int  # replicated leading tokens (joint attention), see cp/prefix.py
    suffix: int  # replicated trailing tokens (joint attention with the text last), likewise
    timeout: float  # bound of the agreement check's wait
    stats: CommStats
    ring_streams: int  # CUDA streams a ring backward's steps take in turn (cp/streams.py)

    @property
    def data_timeout(self) -> float | None: ...

    @property
    def world_size(self) -> int: ...

    @property
    def replicated(self) -> int: ...  # prefix + suffix

    def head_chunks(self, call: AttentionCall, total: int) -> int: ...


@dataclass(frozen=True)
class Agreed:
    """What every rank of the group established together before any data moves."""

    total: int  # global sequence length (the sharded tokens; a replicated prefix or suffix not counted)
    # attn_mask has one row per query, not one row for all: a rank holding a single query cannot tell from its
    # own mask, so this is decided from every rank's
    mask_per_query: bool


class Schedule(Protocol):
    """One context-parallel schedule: one object in one file under cp/, listed in registry.py."""

    name: str  # its cp_strategy value
    mesh_dims: int  # the cp_mesh it runs on: 1-D, or 2-D ('ring', 'ulysses')
    takes_prefix: bool  # runs with cp_replicated_prefix and cp_replicated_suffix
    # where `auto` asks it among the schedules of its mesh: lower first, the first that answers is taken;
    # None: auto never picks it
    auto_order: int | None
    # it evaluates a callable attn_mask (mask_mod) per block itself; else the caller hands it the
    # (local rows x all keys) bool mask
    mask_mod_per_block: bool

    def auto(self, cp: Setup, provider: Provider, call: AttentionCall) -> str | None:
        """Why `auto` takes this schedule for `call` (for the debug log), or None to leave it to the next."""

    def reasons(self, cp: Setup, provider: Provider, call: AttentionCall) -> list[str]:
        """Every reason it cannot run `call`, from this rank's shard alone (before the ranks agree)."""

    def kernel_shapes(self, cp: Setup, call: AttentionCall, total: int, lengths: list[int]) -> set[KernelShape]:
        """The kernel calls it makes for shards of `lengths` tokens out of `total` whose lengths the shard
        check does not cover (see kernel_checks.py); empty where it covers them all."""

    def suggestion(self, provider: Provider, call: AttentionCall, suggest: Suggest | None) -> str:
        """What to use instead when it refuses `call`."""

    def run(self, cp: Setup, provider: Provider, call: AttentionCall, agreed: Agreed) -> torch.Tensor:
        """This rank's attention output; every rank of the group calls it with the same schedule."""


def can_ring(provider: Provider, call: AttentionCall) -> bool:
    """The provider returns a log-sum-exp (to merge blocks) and, where gradients are needed, has a backward that
    takes the global (out, lse). False where it declares nothing for this device."""
    caps = provider.capabilities(call.device.type)
    return caps is not None and caps.returns_lse and (caps.backward or not call.needs_grad)


def with_example(text: str, example: str | None) -> str:
    """A suggestion in words, with a concrete provider appended where the caller found one."""
    return f"{text} (e.g. {example})" if example else text
