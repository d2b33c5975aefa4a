"""The flat dispatcher: one uneven-split all-to-all over the expert-parallel group.

Shapes: W expert-parallel ranks, G local experts per rank (E = W * G), M payload rows on the source
rank (grouped by global expert), R rows received by this rank.

1. `plan(counts_E)`: exchange per-expert row counts (one small all-to-all, tag `moe<i>.counts`) so
   every rank knows how many rows it receives from each source for each of its local experts.
2. `dispatch(payload_MD, meta)`: uneven-split all-to-all of the rows (differentiable), then a local
   regroup from source-major [src][expert] to expert-major [expert][src] order for the grouped matmul.
3. `combine(out_RD, meta)`: the inverse regroup and the reverse all-to-all.
The `*_start`/`*_wait` halves issue the same exchanges asynchronously (their backward is
asynchronous too, see lshmoe.distributed.async_autograd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lshmoe.distributed.async_autograd import AsyncAllToAll
from lshmoe.distributed.autograd import all_to_all
from lshmoe.distributed.comm import Comm, Group
from lshmoe.distributed.tags import MoEOp, Tag
from lshmoe.distributed.wire import NO_WIRES, PLAIN, Wire, Wires
from lshmoe.indexing import inverse_permutation
from lshmoe.moe.dispatch.protocol import DispatchMeta, Inflight, TokenRows


@dataclass(frozen=True, slots=True)
class FlatMeta(DispatchMeta):
    regroup_R: torch.Tensor | None  # received order -> expert-major order (None when already so)
    ungroup_R: torch.Tensor | None  # its inverse
    send_WG: torch.Tensor  # rows this rank sends to each (EP rank, local expert), CPU int64
    recv_WG: torch.Tensor  # rows this rank receives from each (source rank, local expert)


def split_fields(send_WX: torch.Tensor, recv_WX: torch.Tensor) -> dict[str, list[int]]:
    """The `DispatchMeta` splits from the per-(peer, expert) count tables this rank sends and receives."""
    return {
        "in_splits": send_WX.sum(1).tolist(),
        "out_splits": recv_WX.sum(1).tolist(),
        "local_counts": recv_WX.sum(0).tolist(),
    }


def permuted_all_to_all(
    x: torch.Tensor,
    comm: Comm,
    group: Group,
    recv_splits: list[int],
    send_splits: list[int],
    tag: Tag,
    before: torch.Tensor | None = None,
    after: torch.Tensor | None = None,
    wire: Wire = PLAIN,
) -> torch.Tensor:
    """Rows reordered by `before` (None = as they are), exchanged (through `wire`), the received rows
    reordered by `after`."""
    if before is not None:
        x = x.index_select(0, before)
    y = all_to_all(x, comm, group, recv_splits, send_splits, tag, wire)
    return y if after is None else y.index_select(0, after)


def regroup_index(recv_counts_WG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation taking rows ordered [src][expert] to [expert][src], and its inverse."""
    W, G = recv_counts_WG.shape
    # Block (w, g) of the received buffer sorts to position g * W + w.
    key_WG = torch.arange(G).repeat(W) * W + torch.arange(W).repeat_interleave(G)
    seg_R = torch.repeat_interleave(key_WG, recv_counts_WG.reshape(-1))
    regroup = torch.sort(seg_R, stable=True).indices
    return regroup, inverse_permutation(regroup)


class AllToAllDispatcher:
    """Uneven-split all-to-all over an expert-parallel group (see the module docstring)."""

    def __init__(self, comm: Comm, group: Group, num_experts: int, layer: int):
        assert num_experts % group.size == 0, (num_experts, group.size)
        self.comm, self.group, self.layer = comm, group, layer
        self.num_experts, self.num_local = num_experts, num_experts // group.size

    def tag(self, op: MoEOp) -> Tag:
        return Tag.moe(self.layer, op)

    def plan(self, counts_E: torch.Tensor, tokens: TokenRows | None = None, wires: Wires = NO_WIRES) -> FlatMeta:
        """Every payload row travels as is (`tokens` is not used)."""
        W, G = self.group.size, self.num_local
        send_WG = counts_E.to(device=self.comm.device, dtype=torch.int64).view(W, G)
        recv_WG = self.comm.all_to_all_single(send_WG, None, None, self.group, self.tag(MoEOp.COUNTS)).cpu()
        send_WG = send_WG.cpu()
        regroup, ungroup = (None, None) if G == 1 else regroup_index(recv_WG)
        if regroup is not None:
            regroup, ungroup = regroup.to(self.comm.device), ungroup.to(self.comm.device)
        return FlatMeta(
            **split_fields(send_WG, recv_WG),
            regroup_R=regroup,
            ungroup_R=ungroup,
            send_WG=send_WG,
            recv_WG=recv_WG,
            wires=wires,
        )

    def run_experts(self, experts, received_RD: torch.Tensor, meta: FlatMeta) -> torch.Tensor:
        return experts(received_RD, meta.local_counts)

    def dispatch(self, payload_MD: torch.Tensor, meta: FlatMeta) -> torch.Tensor:
        tag = self.tag(MoEOp.DISPATCH)
        return permuted_all_to_all(
            payload_MD,
            self.comm,
            self.group,
            meta.out_splits,
            meta.in_splits,
            tag,
            after=meta.regroup_R,
            wire=meta.wires.dispatch,
        )

    def combine(self, out_RD: torch.Tensor, meta: FlatMeta) -> torch.Tensor:
        tag = self.tag(MoEOp.COMBINE)
        return permuted_all_to_all(
            out_RD, self.comm, self.group, meta.in_splits, meta.out_splits, tag, meta.ungroup_R, wire=meta.wires.combine
        )

    def dispatch_start(self, payload_MD: torch.Tensor, meta: FlatMeta) -> Inflight:
        tag = self.tag(MoEOp.DISPATCH)
        h = AsyncAllToAll(self.comm, self.group, meta.out_splits, meta.in_splits, tag, meta.wires.dispatch)
        return Inflight(h, h.start(payload_MD))

    def dispatch_wait(self, inflight: Inflight, meta: FlatMeta) -> torch.Tensor:
        recv_RD = inflight.handle.wait(inflight.token)
        return recv_RD if meta.regroup_R is None else recv_RD.index_select(0, meta.regroup_R)

    def combine_start(self, out_RD: torch.Tensor, meta: FlatMeta) -> Inflight:
        if meta.ungroup_R is not None:
            out_RD = out_RD.index_select(0, meta.ungroup_R)
        tag = self.tag(MoEOp.COMBINE)
        h = AsyncAllToAll(self.comm, self.group, meta.in_splits, meta.out_splits, tag, meta.wires.combine)
        return Inflight(h, h.start(out_RD))

    def combine_wait(self, inflight: Inflight, meta: FlatMeta) -> torch.Tensor:
        return inflight.handle.wait(inflight.token)
