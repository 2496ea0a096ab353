"""Every schedule by its cp_strategy name. A new schedule is one file under cp/ and one entry below."""

from __future__ import annotations

from .allgather import ALLGATHER
from .hybrid import HYBRID
from .ring import RING
from .schedule import Schedule
from .ulysses import ULYSSES

SCHEDULES: dict[str, Schedule] = {schedule.name: schedule for schedule in (
    RING,
    ULYSSES,
    HYBRID,
    ALLGATHER,
)}

# the cp_strategy values, "auto" first (the agreement check codes a schedule by its place here)
STRATEGIES = ("auto", *SCHEDULES)

# the schedules that run with cp_replicated_prefix
PREFIX_SCHEDULES = tuple(name for name, schedule in SCHEDULES.items() if schedule.takes_prefix)


def auto_candidates(mesh_dims: int) -> list[Schedule]:
    """The schedules `auto` may pick on a mesh of `mesh_dims` dimensions, in the order it asks them."""
    return sorted((s for s in SCHEDULES.values() if s.auto_order is not None and s.mesh_dims == mesh_dims),
                  key=lambda s: s.auto_order)


def schedules_for(mesh_dims: int) -> list[str]:
    """The names of the schedules that run on a mesh of `mesh_dims` dimensions."""
    return [name for name, schedule in SCHEDULES.items() if schedule.mesh_dims == mesh_dims]
