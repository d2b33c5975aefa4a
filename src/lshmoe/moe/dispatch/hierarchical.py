"""Two-level (hierarchical) all-to-all: within the node first, then between nodes.

Ranks are (node n, local index l) with R ranks per node and N nodes (EP group = the world).
    phase A, within the node:  rank (n, l) hands node-mate (n, l') every row bound for (m, l'),
                               for all nodes m, i.e. the node's traffic is gathered per lane l';
    phase B, between nodes:    ranks of one lane, (n, l') and (m, l'), exchange: (m, l') receives
                               the rows for itself from every rank of node n in one message.
After B every rank holds its rows ordered by source rank, exactly the flat all-to-all's output, so
the expert regroup and everything after it are unchanged. The "scatter within the node" of a
leader-based scheme is folded into phase A: rows are gathered at the node-mate that shares the
destination's lane, so the inter-node exchange already lands them at their destination. Inter-node
messages drop from (N R) x (N - 1) R to (N R) x (N - 1), each R times larger; every rank uses its
own lane (NIC) in parallel. Combine runs the two phases in reverse. Both phases are the ledger's
differentiable all-to-alls, so the backward is exact and every byte is attributed to its link class.

Per-expert counts travel as one all-gather of the [W, E] count matrix (every rank computes every
split locally); it grows as W^2, fine for the tens of ranks this targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lshmoe.distributed.comm import Comm, Group
from lshmoe.distributed.tags import MoEOp, Tag
from lshmoe.distributed.wire import NO_WIRES, Wires
from lshmoe.indexing import inverse_permutation
from lshmoe.moe.dispatch.flat import FlatMeta, permuted_all_to_all, regroup_index
from lshmoe.moe.dispatch.protocol import SyncDispatcherBase, TokenRows


@dataclass(frozen=True, slots=True)
class HierMeta(FlatMeta):
    perm_A: torch.Tensor  # payload -> phase-A send order
    inv_A: torch.Tensor
    a_in: list[int]  # phase A splits per node-mate
    a_out: list[int]
    perm_B: torch.Tensor  # phase-A output -> phase-B send order
    inv_B: torch.Tensor
    b_in: list[int]  # phase B splits per lane peer (node)
    b_out: list[int]


def _segments(sizes: list[int]) -> list[tuple[int, int]]:
    out, at = [], 0
    for s in sizes:
        out.append((at, s))
        at += s
    return out


def _perm(order: list[tuple[int, int]]) -> torch.Tensor:
    parts = [torch.arange(start, start + n) for start, n in order if n]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


class HierarchicalDispatcher(SyncDispatcherBase):
    """The two-level exchange (see the module docstring). Its exchanges are synchronous: the
    overlap halves (`*_start`) complete each exchange inside its stage."""

    def __init__(self, comm: Comm, group: Group, num_experts: int, layer: int, ranks_per_node: int):
        W = group.size
        assert W == comm.world_size and W % ranks_per_node == 0, "hierarchical all-to-all needs EP = world"
        self.comm, self.group, self.layer = comm, group, layer
        self.num_experts, self.num_local = num_experts, num_experts // W
        self.R, self.N = ranks_per_node, W // ranks_per_node
        self.node_group, self.lane_group = comm.group("node"), comm.group("lane")

    def plan(self, counts_E: torch.Tensor, tokens: TokenRows | None = None, wires: Wires = NO_WIRES) -> HierMeta:
        """Every payload row travels as is (`tokens` is not used); both stages use `wires`."""
        W, R, N, G = self.group.size, self.R, self.N, self.num_local
        C_WE = self.comm.all_gather(
            counts_E.to(device=self.comm.device, dtype=torch.int64), self.group, Tag.moe(self.layer, MoEOp.COUNTS)
        ).cpu()
        S = C_WE.view(W, W, G).sum(-1).tolist()  # S[src][dst] rows
        me = self.group.index
        n, l = divmod(me, R)
        rank = lambda node, local: node * R + local  # noqa: E731
        # phase A: my payload (ordered by destination rank) regrouped by destination lane, then node
        seg = _segments(S[me])
        perm_A = _perm([seg[rank(m, lp)] for lp in range(R) for m in range(N)])
        a_in = [sum(S[me][rank(m, lp)] for m in range(N)) for lp in range(R)]
        a_out = [sum(S[rank(n, ls)][rank(m, l)] for m in range(N)) for ls in range(R)]
        # phase A output: per node-mate ls, the rows for lane l at every node m; regroup by node m
        sizes_A = [S[rank(n, ls)][rank(m, l)] for ls in range(R) for m in range(N)]
        seg_A = _segments(sizes_A)
        perm_B = _perm([seg_A[ls * N + m] for m in range(N) for ls in range(R)])
        b_in = [sum(S[rank(n, ls)][rank(m, l)] for ls in range(R)) for m in range(N)]
        b_out = [sum(S[rank(np, ls)][me] for ls in range(R)) for np in range(N)]
        recv_WG = C_WE[:, me * G : (me + 1) * G]
        regroup, ungroup = (None, None) if G == 1 else regroup_index(recv_WG)
        dev = self.comm.device
        move = lambda t: None if t is None else t.to(dev)  # noqa: E731
        return HierMeta(
            in_splits=[S[me][q] for q in range(W)],
            out_splits=[S[s][me] for s in range(W)],
            local_counts=recv_WG.sum(0).tolist(),
            regroup_R=move(regroup),
            ungroup_R=move(ungroup),
            send_WG=C_WE[me].view(W, G),
            recv_WG=recv_WG,
            perm_A=perm_A.to(dev),
            inv_A=inverse_permutation(perm_A).to(dev),
            a_in=a_in,
            a_out=a_out,
            perm_B=perm_B.to(dev),
            inv_B=inverse_permutation(perm_B).to(dev),
            b_in=b_in,
            b_out=b_out,
            wires=wires,
        )

    def dispatch(self, payload_MD: torch.Tensor, meta: HierMeta) -> torch.Tensor:
        node, lane = Tag.moe(self.layer, MoEOp.DISPATCH, "node"), Tag.moe(self.layer, MoEOp.DISPATCH, "lane")
        w = meta.wires.dispatch
        a = permuted_all_to_all(
            payload_MD, self.comm, self.node_group, meta.a_out, meta.a_in, node, meta.perm_A, wire=w
        )
        return permuted_all_to_all(
            a, self.comm, self.lane_group, meta.b_out, meta.b_in, lane, meta.perm_B, meta.regroup_R, wire=w
        )

    def combine(self, out_RD: torch.Tensor, meta: HierMeta) -> torch.Tensor:
        node, lane = Tag.moe(self.layer, MoEOp.COMBINE, "node"), Tag.moe(self.layer, MoEOp.COMBINE, "lane")
        w = meta.wires.combine
        b = permuted_all_to_all(out_RD, self.comm, self.lane_group, meta.b_in, meta.b_out, lane, meta.ungroup_R, wire=w)
        return permuted_all_to_all(
            b, self.comm, self.node_group, meta.a_in, meta.a_out, node, meta.inv_B, meta.inv_A, wire=w
        )
