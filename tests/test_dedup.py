"""Per-destination dedup (moe.a2a=dedup) across real gloo ranks: float64-exact against the dense
reference at W = 2 and 4 (output and the gradients of the input, the router and every expert), the
bytes it saves on the ledger, its composition with FP8, and its fallback for LSH centroids. The
W = 4 run (2 nodes x 2 ranks) also checks, in the same processes, that the two-level dispatcher
carries FP8 rows through both of its stages like the flat one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import EXACT
from moe_cases import D, full_expert_params, init_layer, rank_input, router_weight, starve_router

from lshmoe.config import Config, MoEConfig
from lshmoe.moe.layer import MoELayer
from lshmoe.moe.reference import reference_moe
from lshmoe.testing import run_ranks

CASES = [
    dict(name="top2-swiglu", E=8, K=2, act="swiglu", cf=None, tokens=[11, 4, 8, 13], starve=False),
    dict(name="top4-gelu", E=8, K=4, act="gelu", cf=None, tokens=[10, 7, 9, 6], starve=False),
    dict(name="top2-capacity-drops", E=4, K=2, act="gelu", cf=0.5, tokens=[12, 9, 10, 6], starve=False),
    dict(name="top2-empty-rank", E=4, K=2, act="swiglu", cf=1.5, tokens=[10, 0, 6, 0], starve=True),
]


def _cfg(c: dict, a2a: str = "dedup", compress: str = "identity") -> MoEConfig:
    return MoEConfig(
        num_experts=c["E"],
        top_k=c["K"],
        d_expert=5,
        activation=c["act"],
        capacity_factor=c["cf"],
        a2a=a2a,
        compress=compress,
    )


def _run(comm, cfg: MoEConfig, c: dict):
    layer = MoELayer(cfg, D, comm, layer_id=0, settings=Config(moe=cfg)).double()
    init_layer(layer, cfg)
    if c["starve"]:
        starve_router(layer.router.weight)
    x, cot = rank_input(comm.rank, c["tokens"][comm.rank], c["starve"])
    x.requires_grad_(True)
    comm.ledger.enable_timeline(64)
    comm.ledger.timeline.clear()
    o = layer(x)
    loss = (o.y_TD * cot).sum() + 0.3 * o.aux["load_balance"] + 0.2 * o.aux["z_loss"]
    loss.backward()
    sent: dict[tuple[str, str], int] = {}
    for r in comm.ledger.timeline:
        sent[(r.tag, r.phase)] = sent.get((r.tag, r.phase), 0) + r.wire_send_bytes
    comm.ledger.end_step()
    return dict(
        y=o.y_TD.detach(),
        gx=x.grad,
        grouter=layer.router.weight.grad,
        gexperts={n: p.grad for n, p in layer.experts.named_parameters()},
        first=layer.experts.first_expert,
        local=layer.experts.num_local,
        ids=layer.router(x.detach()).topk_ids_TK,
        sent=sent,
    )


def _worker(comm, extras: bool):
    out = {c["name"]: _run(comm, _cfg(c), c) for c in CASES}
    if comm.world_size == 4:
        c = CASES[0]
        out["flat+fp8"] = _run(comm, _cfg(c, "flat", "fp8"), c)
        out["hier+fp8"] = _run(comm, _cfg(c, "hierarchical", "fp8"), c)
    if extras:
        c = CASES[0]
        out["flat"] = _run(comm, _cfg(c, "flat"), c)
        out["dedup+fp8"] = _run(comm, _cfg(c, "dedup", "fp8"), c)
        out["lsh-dedup"] = _run(comm, _cfg(c, "dedup", "lsh"), c)
        out["lsh-flat"] = _run(comm, _cfg(c, "flat", "lsh"), c)
    return out


def _reference(c: dict, world: int):
    cfg = _cfg(c)
    gate = router_weight(cfg, D)
    if c["starve"]:
        starve_router(gate)
    params = full_expert_params(cfg, D)
    total, per_rank = 0.0, []
    for r in range(world):
        x, cot = rank_input(r, c["tokens"][r], c["starve"])
        x.requires_grad_(True)
        y, aux, _ = reference_moe(x, gate, params, cfg)
        total = total + (y * cot).sum() + 0.3 * aux["load_balance"] + 0.2 * aux["z_loss"]
        per_rank.append((x, y.detach()))
    total.backward()
    return gate.grad, params, per_rank


def _unique_rows_to_peers(ids_TK: torch.Tensor, me: int, G: int) -> int:
    """Distinct (token, destination rank) pairs with the destination another rank (dropless)."""
    dest_TK = ids_TK // G
    return sum(int((dest_TK == r).any(-1).sum()) for r in range(int(ids_TK.max()) // G + 1) if r != me)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_dedup_equals_dense_reference_and_saves_bytes(world):
    results = run_ranks(_worker, world, world == 2, timeout_s=60, ranks_per_node=2)
    for c in CASES:
        g_gate, params, per_rank = _reference(c, world)
        got = [res[c["name"]] for res in results]
        for r, (x, y_ref) in enumerate(per_rank):
            assert got[r]["y"].shape == y_ref.shape
            if y_ref.numel():
                assert (got[r]["y"] - y_ref).abs().max().item() <= EXACT, (c["name"], r, "y")
                assert (got[r]["gx"] - x.grad).abs().max().item() <= EXACT, (c["name"], r, "grad x")
            lo, n = got[r]["first"], got[r]["local"]
            for name, g in got[r]["gexperts"].items():
                assert (g - params[name].grad[lo : lo + n]).abs().max().item() <= EXACT, (c["name"], r, name)
        router = sum(g["grouter"] for g in got)
        assert (router - g_gate).abs().max().item() <= EXACT, (c["name"], "router")
    # bytes: each (token, destination) pair crosses once, in dispatch forward and combine backward;
    # one float64 gate weight per routed entry travels beside it
    for c in (CASES[0], CASES[1]):
        G = c["E"] // world
        for r, res in enumerate(results):
            got = res[c["name"]]
            unique = _unique_rows_to_peers(got["ids"], r, G)
            routed = int(((got["ids"] // G) != r).sum())
            assert got["sent"][("moe0.dispatch", "forward")] == unique * D * 8, (c["name"], r)
            assert got["sent"][("moe0.combine", "backward")] == unique * D * 8, (c["name"], r)
            assert got["sent"][("moe0.dispatch.weights", "forward")] == routed * 8, (c["name"], r)
    for name in ("top2-swiglu", "top4-gelu"):
        deduped = sum(res[name]["sent"][("moe0.dispatch", "forward")] for res in results)
        routed = sum(int(((res[name]["ids"] // (8 // world)) != r).sum()) for r, res in enumerate(results))
        assert deduped < routed * D * 8, (name, "some tokens must share a destination")
    if world == 2:
        for r, res in enumerate(results):
            flat, dd, q = res["flat"], res["top2-swiglu"], res["dedup+fp8"]
            assert torch.equal(flat["ids"], dd["ids"])
            routed = int(((flat["ids"] // 4) != r).sum())
            assert flat["sent"][("moe0.dispatch", "forward")] == routed * D * 8
            unique = _unique_rows_to_peers(dd["ids"], r, 4)
            assert q["sent"][("moe0.dispatch", "forward")] == unique * (D + 1), "fp8 codes + one scale byte"
            assert (q["y"] - dd["y"]).abs().max() < 0.2 * dd["y"].abs().max()
            # LSH payload rows are centroids: dedup sends them as the flat dispatcher does
            assert torch.equal(res["lsh-dedup"]["y"], res["lsh-flat"]["y"])
            assert res["lsh-dedup"]["sent"] == res["lsh-flat"]["sent"]
    if world == 4:
        for r, res in enumerate(results):
            flat, hier = res["flat+fp8"], res["hier+fp8"]
            for k in ("y", "gx", "grouter"):
                assert (hier[k] - flat[k]).abs().max().item() <= EXACT, (r, k, "two-level fp8 == flat fp8")
            stages = [b for (t, ph), b in hier["sent"].items() if t.startswith("moe0.dispatch.") and ph == "forward"]
            assert len(stages) == 2 and all(b % (D + 1) == 0 for b in stages), (r, hier["sent"])
            assert sum(stages) > 0
