"""Every schedule by its cp_strategy name. A new schedule is one file under cp/, imported and listed below."""

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

# the schedules that run with cp_replicated_prefix and cp_replicated_suffix
PREFIX_SCHEDULES = tuple(name for name, schedule in SCHEDULES.items() if schedule.takes_prefix)


# per mesh dimensions, the schedules `auto` may pick there, in the order it asks them
AUTO_CANDIDATES: dict[int, tuple[Schedule, ...]] = {
    dims: tuple(sorted((s for s in SCHEDULES.values() if s.auto_order is not None and s.mesh_dims == dims),
                       key=lambda s: s.auto_order))
    for dims in sorted({s.mesh_dims for s in SCHEDULES.values()})
}


def schedules_for(mesh_dims: int) -> list[str]:
    """The names of the schedules that run on a mesh of `mesh_dims` dimensions."""
    return [name for name, schedule in SCHEDULES.items() if schedule.mesh_dims == mesh_dims]
