"""Turn a user's `cp_mesh` (DeviceMesh or ProcessGroup) into the groups the schedules talk over."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class Group:
    """One communication group and this process's place in it."""

    pg: object  # torch.distributed.ProcessGroup
    rank: int
    size: int
    backend: str

    @staticmethod
    def of(pg) -> "Group":
        return Group(pg, dist.get_rank(pg), dist.get_world_size(pg), str(dist.get_backend(pg)).lower())

    def global_rank(self, group_rank: int) -> int:
        return dist.get_global_rank(self.pg, group_rank)

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.size

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.size


@dataclass(frozen=True)
class Topology:
    """Ring group across, Ulysses group inside; a 1-D mesh has one of them of size 1 (None)."""

    ring: Group | None
    ulysses: Group | None
    mesh_dims: int

    @property
    def ring_size(self) -> int:
        return self.ring.size if self.ring else 1

    @property
    def ring_rank(self) -> int:
        return self.ring.rank if self.ring else 0

    @property
    def ulysses_size(self) -> int:
        return self.ulysses.size if self.ulysses else 1

    @property
    def ulysses_rank(self) -> int:
        return self.ulysses.rank if self.ulysses else 0

    @property
    def world_size(self) -> int:
        return self.ring_size * self.ulysses_size


def topology_from_mesh(cp_mesh) -> Topology:
    """1-D mesh or ProcessGroup: one group used by every 1-D schedule (its layout treats it as the ring
    dimension). 2-D DeviceMesh: dimensions named ("ring", "ulysses"), for the 2-D schedules."""
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError("cp_mesh was given but torch.distributed is not initialised")
    if cp_mesh is dist.GroupMember.NON_GROUP_MEMBER or (
        isinstance(cp_mesh, dist.ProcessGroup) and dist.get_rank(cp_mesh) < 0
    ):  # what dist.new_group returns on ranks outside the group
        raise InvalidArgumentError(
            f"this process (global rank {dist.get_rank()}) is not a member of cp_mesh: pass each rank the "
            "process group or DeviceMesh that contains it (the mesh does not match the world)"
        )
    if isinstance(cp_mesh, dist.ProcessGroup):
        return Topology(Group.of(cp_mesh), None, 1)
    ndim = getattr(cp_mesh, "ndim", None)
    if ndim == 1:
        return Topology(Group.of(cp_mesh.get_group()), None, 1)
    if ndim == 2:
        names = tuple(cp_mesh.mesh_dim_names or ())
        if set(names) != {"ring", "ulysses"}:
            raise InvalidArgumentError(
                f"a 2-D cp_mesh needs mesh_dim_names ('ring', 'ulysses'), got {names or None}"
            )
        return Topology(Group.of(cp_mesh.get_group("ring")), Group.of(cp_mesh.get_group("ulysses")), 2)
    raise InvalidArgumentError(
        f"cp_mesh must be a torch.distributed ProcessGroup or a 1-D/2-D DeviceMesh, got {type(cp_mesh).__name__}"
    )

