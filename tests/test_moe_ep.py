"""Expert-parallel exactness: the MoE layer at world sizes 1, 2, 4 equals the dense reference.

float64, max abs error <= 1e-10 for the output and the gradients of the input, the router and every
expert parameter; cases cover top-1 and top-2, GeLU and SwiGLU, uneven loads, token dropping,
an expert that receives no tokens, and a rank with no tokens at all.
"""

from __future__ import annotations

import pytest
from conftest import EXACT
from moe_cases import D, full_expert_params, init_layer, rank_input, router_weight, starve_router

from lshmoe.config import Config, LinaConfig, MoEConfig
from lshmoe.moe.layer import MoELayer
from lshmoe.moe.reference import reference_moe
from lshmoe.testing import run_ranks

CASES = [
    dict(name="top1-gelu", E=4, K=1, act="gelu", cf=None, tokens=[9, 5, 12, 7], starve=False),
    dict(name="top2-swiglu", E=8, K=2, act="swiglu", cf=None, tokens=[11, 4, 8, 13], starve=False),
    dict(name="top2-capacity-drops", E=4, K=2, act="gelu", cf=0.5, tokens=[12, 9, 10, 6], starve=False),
    dict(name="top1-starved-expert", E=4, K=1, act="gelu", cf=None, tokens=[8, 6, 10, 5], starve=True),
    dict(name="top2-empty-rank", E=4, K=2, act="swiglu", cf=1.5, tokens=[10, 0, 6, 0], starve=True),
]


def _config(c: dict) -> MoEConfig:
    return MoEConfig(num_experts=c["E"], top_k=c["K"], d_expert=5, activation=c["act"], capacity_factor=c["cf"])


def _ep_worker(comm, cases):
    out = []
    for c in cases:
        cfg = _config(c)
        layer = MoELayer(cfg, D, comm, layer_id=0).double()
        init_layer(layer, cfg)
        if c["starve"]:
            starve_router(layer.router.weight)
        x, cot = rank_input(comm.rank, c["tokens"][comm.rank], c["starve"])
        x.requires_grad_(True)
        o = layer(x)
        loss = (o.y_TD * cot).sum() + 0.3 * o.aux["load_balance"] + 0.2 * o.aux["z_loss"]
        loss.backward()
        out.append(
            dict(
                y=o.y_TD.detach(),
                gx=x.grad,
                grouter=layer.router.weight.grad,
                gexperts={n: p.grad for n, p in layer.experts.named_parameters()},
                first=layer.experts.first_expert,
                local=layer.experts.num_local,
                counts=o.tokens_per_expert_E,
                dropped=int(o.dropped),
            )
        )
    return out


def _reference(c: dict, world: int):
    cfg = _config(c)
    gate = router_weight(cfg, D)
    if c["starve"]:
        starve_router(gate)
    params = full_expert_params(cfg, D)
    total, per_rank = 0.0, []
    for r in range(world):
        x, cot = rank_input(r, c["tokens"][r], c["starve"])
        x.requires_grad_(True)
        y, aux, dropped = reference_moe(x, gate, params, cfg)
        total = total + (y * cot).sum() + 0.3 * aux["load_balance"] + 0.2 * aux["z_loss"]
        per_rank.append((x, y.detach(), dropped))
    total.backward()
    return gate.grad, {n: p.grad for n, p in params.items()}, per_rank


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_expert_parallel_equals_dense_reference(world):
    results = run_ranks(_ep_worker, world, CASES, timeout_s=30)
    for i, c in enumerate(CASES):
        g_gate, g_params, per_rank = _reference(c, world)
        got = [res[i] for res in results]
        for r, (x, y_ref, dropped) in enumerate(per_rank):
            assert got[r]["y"].shape == y_ref.shape
            err = (got[r]["y"] - y_ref).abs().max().item() if y_ref.numel() else 0.0
            assert err <= EXACT, (c["name"], r, "y", err)
            if x.numel():
                gerr = (got[r]["gx"] - x.grad).abs().max().item()
                assert gerr <= EXACT, (c["name"], r, "grad x", gerr)
            assert got[r]["dropped"] == len(dropped), (c["name"], r)
            lo, n = got[r]["first"], got[r]["local"]
            for name, g in got[r]["gexperts"].items():
                perr = (g - g_params[name][lo : lo + n]).abs().max().item()
                assert perr <= EXACT, (c["name"], r, name, perr)
        router_sum = sum(res["grouter"] for res in got)
        assert (router_sum - g_gate).abs().max().item() <= EXACT, c["name"]
        if c["starve"]:
            assert all(int(res["counts"][-1]) == 0 for res in got), "the starved expert must get no rows"
        if c["cf"] == 0.5:
            assert sum(res["dropped"] for res in got) > 0, "the capacity case must drop tokens"


def _pipeline_worker(comm, pieces):
    out = []
    for chunks in (1, pieces):
        cfg = MoEConfig(num_experts=8, top_k=2, d_expert=5, activation="swiglu")
        layer = MoELayer(cfg, D, comm, layer_id=0, settings=Config(lina=LinaConfig(a2a_chunks=chunks))).double()
        init_layer(layer, cfg)
        x, cot = rank_input(comm.rank, 6 + 5 * comm.rank, starve=comm.rank == 1)
        x.requires_grad_(True)
        o = layer(x)
        (o.y_TD * cot).sum().backward()
        out.append(
            {
                "y": o.y_TD.detach(),
                "gx": x.grad,
                "g": {n: p.grad for n, p in layer.named_parameters()},
                "dispatches": sum(1 for r in comm.ledger.records if r.tag == "moe0.dispatch"),
            }
        )
        comm.ledger.end_step()
    return out


@pytest.mark.slow
def test_pipelined_all_to_all_equals_one_shot():
    """Lina's micro-ops: 3 pieces per exchange, uneven groups, an expert with no rows; exact in float64."""
    for res in run_ranks(_pipeline_worker, 2, 3, timeout_s=30):
        one, piped = res
        assert piped["dispatches"] == 2 * 3 and one["dispatches"] == 2  # forward + backward, per piece
        assert (one["y"] - piped["y"]).abs().max() <= EXACT
        assert (one["gx"] - piped["gx"]).abs().max() <= EXACT
        for n, g in one["g"].items():
            assert (g - piped["g"][n]).abs().max() <= EXACT, n
