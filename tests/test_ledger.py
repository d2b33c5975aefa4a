"""Ledger byte counts equal the bytes expected analytically for a fixed routing, forward and backward.

Two ranks, four experts (two per rank), top-1, D = 8, float64 rows (64 bytes). The router is a
scaled identity on the first four features and each token is a large one-hot on its expert's
feature, so the routing is fixed by construction and the expected per-peer rows follow by hand.
"""

from __future__ import annotations

import pytest
import torch

from lshmoe.config import MoEConfig
from lshmoe.moe.layer import MoELayer
from lshmoe.testing import run_ranks

D, E = 8, 4
ROUTES = {0: [0, 0, 1, 2, 3, 3, 3], 1: [2, 0, 1, 1, 3]}  # expert chosen by each token, per rank
ROW = D * 8  # bytes per float64 row


def _worker(comm):
    cfg = MoEConfig(num_experts=E, top_k=1, d_expert=4, activation="gelu")
    layer = MoELayer(cfg, D, comm, layer_id=0).double()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :E] = 10 * torch.eye(E, dtype=torch.float64)
        layer.experts.reset_parameters(0, 0, 0.3, 0.3)
    x = torch.zeros(len(ROUTES[comm.rank]), D, dtype=torch.float64)
    for t, e in enumerate(ROUTES[comm.rank]):
        x[t, e] = 5.0
    x.requires_grad_(True)
    with comm.ledger.in_phase("forward"):
        y = layer(x).y_TD
    y.sum().backward()  # backward a2a records are tagged 'backward' by the autograd function
    recs = [(r.tag, r.phase, r.send_bytes, r.recv_bytes, r.wire_send_bytes) for r in comm.ledger.records]
    step = comm.ledger.end_step()
    return {"records": recs, "step": step.as_dict(), "routes": layer.router(x.detach()).topk_ids_TK.view(-1).tolist()}


def _rows_to(rank: int, peer: int) -> int:
    return sum(1 for e in ROUTES[rank] if e // 2 == peer)


@pytest.mark.slow
def test_ledger_bytes_match_fixed_routing():
    results = run_ranks(_worker, 2, timeout_s=30)
    for r, res in enumerate(results):
        assert res["routes"] == ROUTES[r], "the construction must fix the routing"
        recs = {(tag, phase): (send, recv, wire) for tag, phase, send, recv, wire in res["records"]}
        assert set(recs) == {
            ("moe0.counts", "forward"),
            ("moe0.dispatch", "forward"),
            ("moe0.combine", "forward"),
            ("moe0.combine", "backward"),
            ("moe0.dispatch", "backward"),
        }
        peer = 1 - r
        # dispatch: rows to each peer; combine: the rows this rank received, sent back.
        send, recv, wire = recs[("moe0.dispatch", "forward")]
        assert send == tuple(_rows_to(r, q) * ROW for q in range(2))
        assert recv == tuple(_rows_to(q, r) * ROW for q in range(2))
        assert wire == _rows_to(r, peer) * ROW
        send, recv, wire = recs[("moe0.combine", "forward")]
        assert send == tuple(_rows_to(q, r) * ROW for q in range(2))
        # backward: the reverse of combine sends what combine received, the reverse of dispatch what it received
        send_b, _, _ = recs[("moe0.combine", "backward")]
        assert send_b == tuple(_rows_to(r, q) * ROW for q in range(2))
        send_b, _, _ = recs[("moe0.dispatch", "backward")]
        assert send_b == tuple(_rows_to(q, r) * ROW for q in range(2))
        # counts: a [W, G] int64 table, G = 2 entries per peer
        assert recs[("moe0.counts", "forward")][0] == (16, 16)
        fwd = (_rows_to(r, peer) + _rows_to(peer, r)) * ROW
        assert res["step"]["a2a_bytes_fwd"] == fwd
        assert res["step"]["a2a_bytes_bwd"] == fwd
        assert res["step"]["a2a_meta_bytes"] == 16


def test_a_library_users_loop_keeps_the_ledger_bounded_without_end_step():
    """The README's loop never calls `comm.ledger.end_step()`: over 10,000 forward/backward steps of a real
    MoE layer the ledger holds at most `max_open` records, and the summary it gives when a step is at last
    ended still counts every collective. One rank, with the flat dispatcher every expert-parallel layer
    uses, over a group of one: its exchanges are local copies, recorded as on W ranks."""
    from lshmoe.distributed import ledger
    from lshmoe.distributed.comm import Comm
    from lshmoe.moe.dispatch.flat import AllToAllDispatcher

    MAX_OPEN = getattr(ledger, "MAX_OPEN", 8192)  # noqa: N806 - the ledger's bound

    comm = Comm.local()
    flat = AllToAllDispatcher(comm, comm.group("ep"), 2, 0)
    layer = MoELayer(MoEConfig(num_experts=2, top_k=1, d_expert=2), 4, comm, layer_id=0, dispatcher=flat)
    x = torch.randn(2, 4)
    most = per_step = 0
    for _ in range(10_000):
        layer(x).y_TD.sum().backward()
        per_step = per_step or len(comm.ledger.records)  # the exchanges of one step
        most = max(most, len(comm.ledger.records))
    assert per_step * 10_000 > MAX_OPEN >= most, "the loop opens more records than the ledger keeps"
    summary = comm.ledger.end_step()
    assert summary.a2a_calls == per_step * 10_000  # every exchange counted, folded or not
    assert 0 < summary.comm_time_s <= summary.a2a_time_s + summary.other_time_s + summary.allreduce_time_s + 1e-9
    assert comm.ledger.records == [] and comm.ledger.end_step().a2a_calls == 0
