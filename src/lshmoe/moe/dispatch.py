"""Dispatchers: move payload rows to the ranks of their experts and bring the outputs back.

Shapes: W expert-parallel ranks, G local experts per rank (E = W * G), M payload rows on the source
rank (grouped by global expert), R rows received by this rank.

A dispatch is three steps:
1. `plan(counts_E)`: exchange per-expert row counts (one small all-to-all, tag `<layer>.counts`) so
   every rank knows how many rows it receives from each source for each of its local experts.
2. `dispatch(payload_MD, meta)`: uneven-split all-to-all of the rows (differentiable), then a local
   regroup from source-major [src][expert] to expert-major [expert][src] order for the grouped matmul.
3. `combine(out_RD, meta)`: the inverse regroup and the reverse all-to-all.

Every rank takes the same collective path whatever its load: a rank that sends or receives zero rows
still joins both exchanges with empty splits, so an idle expert can never hang the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lshmoe.distributed.async_autograd import AsyncAllToAll
from lshmoe.distributed.autograd import all_to_all
from lshmoe.distributed.comm import Comm, Group


@dataclass(frozen=True, slots=True)
class DispatchMeta:
    """What combine needs from dispatch."""

    in_splits: list[int]  # rows this rank sends to each EP rank
    out_splits: list[int]  # rows this rank receives from each EP rank
    local_counts: list[int]  # rows per local expert after regrouping (expert-major)
    regroup_R: torch.Tensor | None  # received order -> expert-major order (None when already so)
    ungroup_R: torch.Tensor | None  # its inverse
    send_WG: torch.Tensor  # rows this rank sends to each (EP rank, local expert), CPU int64
    recv_WG: torch.Tensor  # rows this rank receives from each (source rank, local expert)


@dataclass(frozen=True, slots=True)
class Inflight:
    """An exchange issued but not waited for: its handle (None when local) and autograd token."""

    handle: AsyncAllToAll | None
    token: torch.Tensor


class LocalDispatcher:
    """Expert-parallel size 1: every expert is local, nothing crosses ranks."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def plan(self, counts_E: torch.Tensor) -> DispatchMeta:
        n = int(counts_E.sum())
        c = counts_E.cpu().view(1, -1)
        return DispatchMeta([n], [n], counts_E.tolist(), None, None, c, c)

    def dispatch(self, payload_MD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        return payload_MD

    def combine(self, out_RD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        return out_RD

    def dispatch_start(self, payload_MD: torch.Tensor, meta: DispatchMeta) -> Inflight:
        return Inflight(None, payload_MD)

    def dispatch_wait(self, inflight: Inflight, meta: DispatchMeta) -> torch.Tensor:
        return inflight.token

    def combine_start(self, out_RD: torch.Tensor, meta: DispatchMeta) -> Inflight:
        return Inflight(None, out_RD)

    def combine_wait(self, inflight: Inflight, meta: DispatchMeta) -> torch.Tensor:
        return inflight.token


def regroup_index(recv_counts_WG: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation taking rows ordered [src][expert] to [expert][src], and its inverse."""
    W, G = recv_counts_WG.shape
    # Block (w, g) of the received buffer sorts to position g * W + w.
    key_WG = torch.arange(G).repeat(W) * W + torch.arange(W).repeat_interleave(G)
    seg_R = torch.repeat_interleave(key_WG, recv_counts_WG.reshape(-1))
    regroup = torch.sort(seg_R, stable=True).indices
    ungroup = torch.empty_like(regroup)
    ungroup[regroup] = torch.arange(regroup.numel())
    return regroup, ungroup


class AllToAllDispatcher:
    """Uneven-split all-to-all over an expert-parallel group (DESIGN.md §1, §2)."""

    def __init__(self, comm: Comm, group: Group, num_experts: int, tag: str):
        assert num_experts % group.size == 0, (num_experts, group.size)
        self.comm, self.group, self.tag = comm, group, tag
        self.num_experts, self.num_local = num_experts, num_experts // group.size

    def plan(self, counts_E: torch.Tensor) -> DispatchMeta:
        W, G = self.group.size, self.num_local
        send_WG = counts_E.to(device=self.comm.device, dtype=torch.int64).view(W, G)
        recv_WG = self.comm.all_to_all_single(send_WG, None, None, self.group, f"{self.tag}.counts").cpu()
        send_WG = send_WG.cpu()
        regroup, ungroup = (None, None) if G == 1 else regroup_index(recv_WG)
        if regroup is not None:
            regroup, ungroup = regroup.to(self.comm.device), ungroup.to(self.comm.device)
        return DispatchMeta(
            in_splits=send_WG.sum(1).tolist(),
            out_splits=recv_WG.sum(1).tolist(),
            local_counts=recv_WG.sum(0).tolist(),
            regroup_R=regroup,
            ungroup_R=ungroup,
            send_WG=send_WG,
            recv_WG=recv_WG,
        )

    def dispatch(self, payload_MD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        recv_RD = all_to_all(payload_MD, self.comm, self.group, meta.out_splits, meta.in_splits, f"{self.tag}.dispatch")
        return recv_RD if meta.regroup_R is None else recv_RD.index_select(0, meta.regroup_R)

    def combine(self, out_RD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        if meta.ungroup_R is not None:
            out_RD = out_RD.index_select(0, meta.ungroup_R)
        return all_to_all(out_RD, self.comm, self.group, meta.in_splits, meta.out_splits, f"{self.tag}.combine")

    # Asynchronous halves of the same exchanges, for overlap with dense work (ScMoE). Their backward
    # passes are asynchronous too (see lshmoe.distributed.async_autograd).

    def dispatch_start(self, payload_MD: torch.Tensor, meta: DispatchMeta) -> Inflight:
        h = AsyncAllToAll(self.comm, self.group, meta.out_splits, meta.in_splits, f"{self.tag}.dispatch")
        return Inflight(h, h.start(payload_MD))

    def dispatch_wait(self, inflight: Inflight, meta: DispatchMeta) -> torch.Tensor:
        recv_RD = inflight.handle.wait(inflight.token)
        return recv_RD if meta.regroup_R is None else recv_RD.index_select(0, meta.regroup_R)

    def combine_start(self, out_RD: torch.Tensor, meta: DispatchMeta) -> Inflight:
        if meta.ungroup_R is not None:
            out_RD = out_RD.index_select(0, meta.ungroup_R)
        h = AsyncAllToAll(self.comm, self.group, meta.in_splits, meta.out_splits, f"{self.tag}.combine")
        return Inflight(h, h.start(out_RD))

    def combine_wait(self, inflight: Inflight, meta: DispatchMeta) -> torch.Tensor:
        return inflight.handle.wait(inflight.token)


def build_dispatcher(comm: Comm, group: Group, num_experts: int, tag: str, kind: str = "flat"):
    if group.size == 1:
        return LocalDispatcher(num_experts)
    if kind == "hierarchical":
        from lshmoe.moe.dispatch_hier import HierarchicalDispatcher

        rpn = comm.group("node").size
        return HierarchicalDispatcher(comm, group, num_experts, tag, rpn)
    return AllToAllDispatcher(comm, group, num_experts, tag)
