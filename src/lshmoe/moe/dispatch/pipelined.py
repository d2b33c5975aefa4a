"""All-to-all micro-ops along the token dimension (Lina): experts compute piece i while piece i+1 travels.

`PipelinedDispatcher` wraps the flat dispatcher and fuses its exchanges with the expert computation:
`dispatch` defers (nothing travels yet), `run_experts` runs the pipelined dispatch/experts/combine and
returns rows already combined in payload order, and `combine` hands them back.

The payload rows of every (destination rank, local expert) group are cut into `c` near-equal pieces
(group of n rows: piece i gets n // c rows, plus one for i < n % c). Piece i of every group travels in
one asynchronous all-to-all; the receiver, which knows the same counts, cuts its own groups the same
way, so it can regroup piece i by expert and run the experts on it while piece i+1 arrives; the
piece's combine all-to-all is issued at once and all are waited for at the end. Rows are processed
independently by the experts, so the result equals the unpipelined layer exactly; the backward of
every exchange is asynchronous too (lshmoe.distributed.async_autograd).
"""

from __future__ import annotations

import torch
from torch import nn

from lshmoe.distributed.async_autograd import AsyncAllToAll
from lshmoe.distributed.comm import Comm, Group
from lshmoe.distributed.tags import MoEOp, Tag
from lshmoe.moe.dispatch.flat import AllToAllDispatcher, FlatMeta, regroup_index
from lshmoe.moe.dispatch.protocol import SyncDispatcherBase


def split_counts(counts: torch.Tensor, pieces: int) -> torch.Tensor:
    """[pieces, *counts.shape]: counts cut into near-equal parts, the first n % pieces one row larger."""
    base, extra = counts // pieces, counts % pieces
    idx = torch.arange(pieces).view(-1, *([1] * counts.dim()))
    return base.unsqueeze(0) + (idx < extra.unsqueeze(0)).long()


def piece_index(counts_G: torch.Tensor, parts_PG: torch.Tensor, i: int) -> torch.Tensor:
    """Row indices (into a buffer of groups laid out back to back) of piece i of every group."""
    starts = torch.cumsum(counts_G, 0) - counts_G
    offs = starts + parts_PG[:i].sum(0)
    idx = [torch.arange(int(o), int(o) + int(n)) for o, n in zip(offs, parts_PG[i], strict=True) if n]
    return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)


def pipelined_exchange(
    payload_MD: torch.Tensor,
    send_WG: torch.Tensor,
    recv_WG: torch.Tensor,
    experts,
    comm: Comm,
    group: Group,
    layer: int,
    pieces: int,
) -> torch.Tensor:
    """Dispatch, experts and combine in `pieces` micro-ops; returns the combined rows in payload order."""
    W, G = send_WG.shape
    send_parts = split_counts(send_WG.reshape(-1), pieces)  # [P, W*G]
    recv_parts = split_counts(recv_WG.reshape(-1), pieces)
    dev = payload_MD.device
    out_pieces, idx_pieces, inflight = [], [], []
    handles: list[tuple[AsyncAllToAll, torch.Tensor]] = []

    def start(i: int) -> None:
        idx = piece_index(send_WG.reshape(-1), send_parts, i).to(dev)
        h = AsyncAllToAll(
            comm,
            group,
            recv_parts[i].view(W, G).sum(1).tolist(),
            send_parts[i].view(W, G).sum(1).tolist(),
            Tag.moe(layer, MoEOp.DISPATCH),
        )
        handles.append((h, h.start(payload_MD.index_select(0, idx))))
        idx_pieces.append(idx)

    start(0)
    for i in range(pieces):
        if i + 1 < pieces:
            start(i + 1)  # the next piece travels while this one is computed
        h, token = handles[i]
        rows = h.wait(token)
        recv_i = recv_parts[i].view(W, G)
        regroup, ungroup = (None, None) if G == 1 else regroup_index(recv_i)
        if regroup is not None:
            rows = rows.index_select(0, regroup.to(dev))
        out = experts(rows, recv_i.sum(0).tolist())
        if ungroup is not None:
            out = out.index_select(0, ungroup.to(dev))
        c = AsyncAllToAll(
            comm, group, send_parts[i].view(W, G).sum(1).tolist(), recv_i.sum(1).tolist(), Tag.moe(layer, MoEOp.COMBINE)
        )
        inflight.append((c, c.start(out)))
    for c, token in inflight:
        out_pieces.append(c.wait(token))
    order = torch.cat(idx_pieces)
    result = payload_MD.new_empty((0, out_pieces[0].shape[-1] if out_pieces else payload_MD.shape[-1]))
    if order.numel():
        result = torch.cat(out_pieces).index_select(0, torch.argsort(order))
    return result


class PipelinedDispatcher(SyncDispatcherBase):
    """The flat exchange cut into `pieces` micro-ops, fused with the experts (module docstring)."""

    def __init__(self, inner: AllToAllDispatcher, pieces: int):
        assert pieces > 1, pieces
        self.inner, self.pieces = inner, pieces

    def plan(self, counts_E: torch.Tensor) -> FlatMeta:
        return self.inner.plan(counts_E)

    def dispatch(self, payload_MD: torch.Tensor, meta: FlatMeta) -> torch.Tensor:
        return payload_MD  # travels piece by piece inside run_experts

    def run_experts(self, experts: nn.Module, received_RD: torch.Tensor, meta: FlatMeta) -> torch.Tensor:
        inner = self.inner
        return pipelined_exchange(
            received_RD, meta.send_WG, meta.recv_WG, experts, inner.comm, inner.group, inner.layer, self.pieces
        )

    def combine(self, out_RD: torch.Tensor, meta: FlatMeta) -> torch.Tensor:
        return out_RD  # combined piece by piece inside run_experts
