"""A dispatcher that sends each expert's rows to its replicas under a per-call placement.

Shapes: W ranks, E experts (every rank holds all E, so any rank can serve any replica), M payload
rows on the source rank (grouped by expert, as `sort_by_expert` leaves them), R rows received.

It implements the dispatcher protocol (`lshmoe.moe.dispatch.protocol`):
1. `plan(counts_E)`: take the placement for this call (from the policy, e.g. Lina's two-phase
   scheduler, which may run its own collectives first), cut each expert's rows into one contiguous
   piece per replica (`placement.send_table`), and exchange the per-(destination, expert) row counts
   with one all-to-all of a [W, E] int64 table (tag `<layer>.counts`).
2. `dispatch(payload_MD, meta)`: reorder the payload from [expert][replica piece] to [destination]
   [expert], run the uneven-split all-to-all, and regroup the received [source][expert] rows to
   [expert][source] for the grouped matmul; `meta.local_counts` has one entry per expert (0 for the
   experts this rank does not serve).
3. `combine(out_RD, meta)`: the inverse regroup, the reverse all-to-all, the inverse reorder.

With `source_major=True` the received rows stay in arrival order [source][expert] (no regroup) and
`run_experts` runs the experts once per source with `meta.recv_WE[source]` as the group sizes: every
piece is then its own matmul, which (with aligned cuts, see `placement.split_sizes`) gives each row
exactly the arithmetic of an unreplicated forward. The inference engine uses this form (and times
the expert computation itself: as the protocol asks, nothing about a call is kept on the dispatcher).

Every rank takes the same collective path whatever the placement and the load: a rank that serves
no expert, or an expert that receives no rows, still joins every exchange with empty splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lshmoe.distributed.autograd import all_to_all
from lshmoe.distributed.comm import Comm, Group
from lshmoe.distributed.tags import MoEOp, Tag
from lshmoe.distributed.wire import NO_WIRES, Wires
from lshmoe.indexing import inverse_permutation
from lshmoe.infer.placement import SPLIT_ALIGN, Placement, send_table
from lshmoe.moe.dispatch.flat import permuted_all_to_all, regroup_index, split_fields
from lshmoe.moe.dispatch.protocol import DispatchMeta, SyncDispatcherBase, TokenRows

PlacementPolicy = Callable[[torch.Tensor], Placement]  # counts_E of this rank -> the placement of this call


@dataclass(frozen=True, slots=True)
class ReplicaMeta(DispatchMeta):
    """What dispatch and combine need from plan; `local_counts` has one entry per expert (length E)."""

    regroup_R: torch.Tensor | None  # received order -> expert-major order (None when already so)
    ungroup_R: torch.Tensor | None  # its inverse
    send_M: torch.Tensor | None  # payload order -> send order (None when already so)
    unsend_M: torch.Tensor | None  # its inverse
    placement: Placement
    recv_WE: torch.Tensor  # rows received from each source for each expert (int64, on the CPU)


def send_order(send_WE: torch.Tensor, placement: Placement) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Permutation taking payload rows from [expert][replica piece] to [destination][expert] order,
    and its inverse; None when the payload is already in send order (every expert on one rank, and
    the ranks non-decreasing in the expert id)."""
    owners = [devs[0] for devs in placement.replicas]
    if all(len(devs) == 1 for devs in placement.replicas) and owners == sorted(owners):
        return None
    E = placement.num_experts
    # Block (expert e, piece j) lies at payload position order (e, j); it is sent at position (d_j, e).
    keys, sizes = [], []
    for e, devs in enumerate(placement.replicas):
        for d in devs:
            keys.append(d * E + e)
            sizes.append(int(send_WE[d, e]))
    seg_M = torch.repeat_interleave(torch.tensor(keys, dtype=torch.int64), torch.tensor(sizes, dtype=torch.int64))
    send = torch.sort(seg_M, stable=True).indices
    return send, inverse_permutation(send)


class ReplicaDispatcher(SyncDispatcherBase):
    """Uneven-split all-to-all over `group` to the replicas of each expert (see the module docstring)."""

    def __init__(
        self,
        comm: Comm,
        group: Group,
        num_experts: int,
        layer: int,
        policy: PlacementPolicy | Placement,
        *,
        align: int = SPLIT_ALIGN,
        source_major: bool = False,
    ):
        self.comm, self.group, self.layer, self.num_experts = comm, group, layer, num_experts
        self.policy, self.align, self.source_major = policy, align, source_major

    def placement_for(self, counts_E: torch.Tensor) -> Placement:
        placement = self.policy if isinstance(self.policy, Placement) else self.policy(counts_E)
        if placement.num_devices != self.group.size or placement.num_experts != self.num_experts:
            raise ValueError(
                f"placement of {placement.num_experts} experts on {placement.num_devices} devices for "
                f"a dispatcher of {self.num_experts} experts over {self.group.size} ranks"
            )
        return placement

    def plan(self, counts_E: torch.Tensor, tokens: TokenRows | None = None, wires: Wires = NO_WIRES) -> ReplicaMeta:
        """Every payload row travels as is (`tokens` is not used)."""
        placement = self.placement_for(counts_E)
        dev = self.comm.device
        send_WE = send_table(counts_E.cpu(), placement, self.align)
        recv_WE = self.comm.all_to_all_single(
            send_WE.to(dev), None, None, self.group, Tag.moe(self.layer, MoEOp.COUNTS)
        ).cpu()
        order = send_order(send_WE, placement)
        send, unsend = (None, None) if order is None else (order[0].to(dev), order[1].to(dev))
        regroup = ungroup = None
        if not self.source_major:
            regroup, ungroup = regroup_index(recv_WE)
            if torch.equal(regroup, torch.arange(regroup.numel())):
                regroup = ungroup = None
            else:
                regroup, ungroup = regroup.to(dev), ungroup.to(dev)
        return ReplicaMeta(
            **split_fields(send_WE, recv_WE),
            regroup_R=regroup,
            ungroup_R=ungroup,
            send_M=send,
            unsend_M=unsend,
            placement=placement,
            recv_WE=recv_WE,
            wires=wires,
        )

    def run_experts(self, experts: nn.Module, received_RD: torch.Tensor, meta: ReplicaMeta) -> torch.Tensor:
        """Expert-major rows: one grouped matmul. Source-major: one per source (module docstring)."""
        if not self.source_major:
            return experts(received_RD, meta.local_counts)
        outs = [
            experts(rows, counts)
            for rows, counts, n in zip(
                torch.split(received_RD, meta.out_splits), meta.recv_WE.tolist(), meta.out_splits, strict=True
            )
            if n
        ]
        return torch.cat(outs) if outs else experts(received_RD, meta.local_counts)

    def dispatch(self, payload_MD: torch.Tensor, meta: ReplicaMeta) -> torch.Tensor:
        send_MD = payload_MD if meta.send_M is None else payload_MD.index_select(0, meta.send_M)
        splits, tag = (meta.out_splits, meta.in_splits), Tag.moe(self.layer, MoEOp.DISPATCH)
        recv_RD = all_to_all(send_MD, self.comm, self.group, *splits, tag, meta.wires.dispatch)
        return recv_RD if meta.regroup_R is None else recv_RD.index_select(0, meta.regroup_R)

    def combine(self, out_RD: torch.Tensor, meta: ReplicaMeta) -> torch.Tensor:
        tag = Tag.moe(self.layer, MoEOp.COMBINE)
        return permuted_all_to_all(
            out_RD,
            self.comm,
            self.group,
            meta.in_splits,
            meta.out_splits,
            tag,
            meta.ungroup_R,
            meta.unsend_M,
            wire=meta.wires.combine,
        )
