"""Topology: which rank lives on which node, and how ranks split into parallel groups.

Nodes are blocks of `ranks_per_node` consecutive ranks (torchrun's LOCAL_WORLD_SIZE convention).
Expert-parallel (EP) groups are blocks of `ep_size` consecutive ranks, so an EP group fills nodes
before it spans them; expert-data-parallel (EDP) groups hold the ranks with the same position in
every EP group and all-reduce expert gradients. Dense parameters are data-parallel over the world.
All functions here are pure so the layout can be tested without processes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Topology:
    world_size: int
    ranks_per_node: int

    def __post_init__(self) -> None:
        if self.world_size % self.ranks_per_node:
            raise ValueError(f"ranks_per_node={self.ranks_per_node} must divide world size {self.world_size}")

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def node_map(self) -> dict[int, int]:
        return {r: self.node_of(r) for r in range(self.world_size)}

    def node_ranks(self, node: int) -> tuple[int, ...]:
        return tuple(range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node))


def ep_groups(world_size: int, ep_size: int) -> list[tuple[int, ...]]:
    """Expert-parallel groups: consecutive blocks of `ep_size` ranks."""
    return [tuple(range(s, s + ep_size)) for s in range(0, world_size, ep_size)]


def edp_groups(world_size: int, ep_size: int) -> list[tuple[int, ...]]:
    """Expert-data-parallel groups: ranks holding the same experts (same index in every EP group)."""
    return [tuple(range(i, world_size, ep_size)) for i in range(ep_size)]
