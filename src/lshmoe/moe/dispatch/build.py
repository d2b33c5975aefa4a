"""Which dispatcher a layer gets: the one registration point of the dispatcher seam (`moe.a2a`)."""

from __future__ import annotations

from collections.abc import Callable

from lshmoe.distributed.comm import Comm, Group
from lshmoe.moe.dispatch.dedup import DedupDispatcher
from lshmoe.moe.dispatch.flat import AllToAllDispatcher
from lshmoe.moe.dispatch.hierarchical import HierarchicalDispatcher
from lshmoe.moe.dispatch.local import LocalDispatcher
from lshmoe.moe.dispatch.pipelined import PipelinedDispatcher
from lshmoe.moe.dispatch.protocol import Dispatcher


def _flat(comm: Comm, group: Group, num_experts: int, layer: int, chunks: int) -> Dispatcher:
    flat = AllToAllDispatcher(comm, group, num_experts, layer)
    return PipelinedDispatcher(flat, chunks) if chunks > 1 else flat


# kind -> builder(comm, group, num_experts, layer, chunks); config validation rejects chunks > 1
# for every kind but flat.
BUILDERS: dict[str, Callable[..., Dispatcher]] = {
    "flat": _flat,
    "hierarchical": lambda comm, group, e, layer, chunks: HierarchicalDispatcher(
        comm, group, e, layer, comm.group("node").size
    ),
    "dedup": lambda comm, group, e, layer, chunks: DedupDispatcher(comm, group, e, layer),
}
KINDS = tuple(BUILDERS)


def build_dispatcher(
    comm: Comm, group: Group, num_experts: int, layer: int, kind: str = "flat", chunks: int = 1
) -> Dispatcher:
    """EP size 1: local; otherwise the `kind` (flat cut into `chunks` pipelined micro-ops when chunks > 1)."""
    if group.size == 1:
        return LocalDispatcher(num_experts)
    return BUILDERS[kind](comm, group, num_experts, layer, chunks)
