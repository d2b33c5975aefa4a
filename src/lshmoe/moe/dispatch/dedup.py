"""Per-destination dedup: a token crosses to a rank once, however many of that rank's experts it chose.

Lossless. Shapes: W ranks, G local experts, M payload rows on the source (one per kept (token,
expert) pair, grouped by expert and so by destination rank), U unique (destination, token) rows
this rank sends, R routed entries this rank receives, V unique rows it receives.

Source side (plan + dispatch):
1. key each payload row by (destination rank, token); `unique` gives the U rows to send (sorted, so
   grouped by destination) and for each payload row its slot among its destination's rows;
2. one count exchange of a [W, G + 1] table (rows per local expert, unique rows) replaces the flat
   dispatcher's [W, G] one; the slots (int64 metadata, tag `moe<i>.counts.slots`) and the gate
   weights (differentiable, tag `moe<i>.dispatch.weights`) travel with the routed entries' splits;
3. the U token rows travel (tag `moe<i>.dispatch`, through the compressor's wire codec).
Destination side: each routed entry's row is fanned out from the received unique rows by its slot,
regrouped expert-major for the experts; `combine` multiplies each expert output by its gate weight
and sums the outputs of one (source, token) before the return trip, so V rows go back. On the source
the returned sum lands on the first payload row of its (destination, token) and the others get
zeros: `meta.weighted` is True and the layer sums the rows with unit weights.

Gradients are exact: the weights' exchange is differentiable (its backward returns d w per routed
entry), the sum's backward fans d y out again, and the token rows' backward sums the copies.
Bytes: U + V rows instead of 2 M, plus one weight and one slot per routed entry.

Without `tokens` (payload rows that are not token copies, e.g. LSH centroids, or the probe's rows)
every row travels as in the flat dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lshmoe.distributed.autograd import all_to_all
from lshmoe.distributed.comm import Comm, Group
from lshmoe.distributed.tags import MoEOp, Tag
from lshmoe.distributed.wire import NO_WIRES, Wires
from lshmoe.moe.dispatch.flat import AllToAllDispatcher, FlatMeta, regroup_index, split_fields
from lshmoe.moe.dispatch.protocol import SyncDispatcherBase, TokenRows


@dataclass(frozen=True, slots=True)
class DedupMeta(FlatMeta):
    first_U: torch.Tensor  # payload row sent for each unique (destination, token)
    num_payload: int  # M
    u_send: list[int]  # unique rows to each rank
    u_recv: list[int]  # unique rows from each rank
    slot_R: torch.Tensor  # received unique row of each routed entry, expert-major order
    weight_R: torch.Tensor  # gate weight of each routed entry, expert-major order [R, 1]


class DedupDispatcher(SyncDispatcherBase):
    """Flat all-to-all with per-destination dedup (module docstring)."""

    def __init__(self, comm: Comm, group: Group, num_experts: int, layer: int):
        self.flat = AllToAllDispatcher(comm, group, num_experts, layer)
        self.comm, self.group, self.layer = comm, group, layer
        self.num_experts, self.num_local = num_experts, num_experts // group.size

    def plan(self, counts_E: torch.Tensor, tokens: TokenRows | None = None, wires: Wires = NO_WIRES) -> FlatMeta:
        if tokens is None:
            return self.flat.plan(counts_E, None, wires)
        W, G, dev = self.group.size, self.num_local, self.comm.device
        counts_E = counts_E.to(device=dev, dtype=torch.int64)
        M = int(counts_E.sum())
        dest_M = torch.repeat_interleave(torch.arange(W, device=dev).repeat_interleave(G), counts_E)
        token_M = tokens.token_M.to(dev)
        span = int(token_M.max()) + 1 if M else 1
        uniq_U, inv_M = torch.unique(dest_M * span + token_M, sorted=True, return_inverse=True)
        u_W = torch.bincount(uniq_U // span, minlength=W)
        first_U = torch.full((uniq_U.numel(),), M, dtype=torch.int64, device=dev)
        first_U = first_U.scatter_reduce(0, inv_M, torch.arange(M, device=dev), "amin")
        slot_M = inv_M - (torch.cumsum(u_W, 0) - u_W).index_select(0, dest_M)
        send_WX = torch.cat([counts_E.view(W, G), u_W.view(W, 1)], 1)
        recv_WX = self.comm.all_to_all_single(send_WX, None, None, self.group, Tag.moe(self.layer, MoEOp.COUNTS)).cpu()
        send_WX = send_WX.cpu()
        send_WG, recv_WG = send_WX[:, :G], recv_WX[:, :G]
        splits = split_fields(send_WG, recv_WG)
        u_send, u_recv = send_WX[:, G].tolist(), recv_WX[:, G].tolist()
        slots = self.comm.all_to_all_single(
            slot_M, splits["out_splits"], splits["in_splits"], self.group, Tag.moe(self.layer, MoEOp.COUNTS, "slots")
        )
        tag = Tag.moe(self.layer, MoEOp.DISPATCH, "weights")
        w_R = all_to_all(
            tokens.weight_M.reshape(-1, 1), self.comm, self.group, splits["out_splits"], splits["in_splits"], tag
        )
        # received slots are per source; offset them into the buffer of all received unique rows
        src_R = torch.repeat_interleave(torch.arange(W, device=dev), torch.tensor(splits["out_splits"], device=dev))
        u_recv_t = torch.tensor(u_recv, device=dev)
        slot_R = slots + (torch.cumsum(u_recv_t, 0) - u_recv_t).index_select(0, src_R)
        regroup, ungroup = (None, None) if G == 1 else regroup_index(recv_WG)
        if regroup is not None:
            regroup, ungroup = regroup.to(dev), ungroup.to(dev)
            slot_R, w_R = slot_R.index_select(0, regroup), w_R.index_select(0, regroup)
        return DedupMeta(
            **splits,
            regroup_R=regroup,
            ungroup_R=ungroup,
            send_WG=send_WG,
            recv_WG=recv_WG,
            wires=wires,
            weighted=True,
            first_U=first_U,
            num_payload=M,
            u_send=u_send,
            u_recv=u_recv,
            slot_R=slot_R,
            weight_R=w_R,
        )

    def dispatch(self, payload_MD: torch.Tensor, meta: FlatMeta) -> torch.Tensor:
        if not isinstance(meta, DedupMeta):
            return self.flat.dispatch(payload_MD, meta)
        x_UD = payload_MD.index_select(0, meta.first_U)
        tag = Tag.moe(self.layer, MoEOp.DISPATCH)
        recv_VD = all_to_all(x_UD, self.comm, self.group, meta.u_recv, meta.u_send, tag, meta.wires.dispatch)
        return recv_VD.index_select(0, meta.slot_R)  # fanned out, expert-major

    def combine(self, out_RD: torch.Tensor, meta: FlatMeta) -> torch.Tensor:
        if not isinstance(meta, DedupMeta):
            return self.flat.combine(out_RD, meta)
        V = sum(meta.u_recv)
        weighted_RD = out_RD * meta.weight_R.to(out_RD.dtype)
        sum_VD = out_RD.new_zeros((V, out_RD.shape[-1])).index_add(0, meta.slot_R, weighted_RD)
        tag = Tag.moe(self.layer, MoEOp.COMBINE)
        back_UD = all_to_all(sum_VD, self.comm, self.group, meta.u_send, meta.u_recv, tag, meta.wires.combine)
        out_MD = back_UD.new_zeros((meta.num_payload, back_UD.shape[-1]))
        return out_MD.index_copy(0, meta.first_U, back_UD)
