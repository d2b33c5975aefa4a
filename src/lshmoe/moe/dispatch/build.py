"""Which dispatcher a layer gets: the one registration point of the dispatcher seam."""

from __future__ import annotations

from lshmoe.distributed.comm import Comm, Group
from lshmoe.moe.dispatch.flat import AllToAllDispatcher
from lshmoe.moe.dispatch.hierarchical import HierarchicalDispatcher
from lshmoe.moe.dispatch.local import LocalDispatcher
from lshmoe.moe.dispatch.pipelined import PipelinedDispatcher
from lshmoe.moe.dispatch.protocol import Dispatcher

KINDS = ("flat", "hierarchical")  # moe.a2a


def build_dispatcher(
    comm: Comm, group: Group, num_experts: int, layer: int, kind: str = "flat", chunks: int = 1
) -> Dispatcher:
    """EP size 1: local; `hierarchical`: two-level; `flat`: one all-to-all, cut into `chunks`
    pipelined micro-ops when chunks > 1 (config validation rejects chunks > 1 with hierarchical)."""
    if group.size == 1:
        return LocalDispatcher(num_experts)
    if kind == "hierarchical":
        return HierarchicalDispatcher(comm, group, num_experts, layer, comm.group("node").size)
    flat = AllToAllDispatcher(comm, group, num_experts, layer)
    return PipelinedDispatcher(flat, chunks) if chunks > 1 else flat
