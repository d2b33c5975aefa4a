"""LocMoE: GrAP gate, locality loss, node-limited routing, capacity bound, the hierarchical all-to-all
(exact against the flat one, forward and gradients) and per-link-class byte accounting."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import EXACT
from moe_cases import D, init_layer, rank_input

from lshmoe.config import Config, ConfigError, LocMoEConfig, ModelConfig, MoEConfig, validate
from lshmoe.moe.layer import MoELayer
from lshmoe.moe.locality import (
    GrAPGate,
    betainc,
    capacity_lower_bound,
    locality_loss,
    measured_delta,
    node_limited_mask,
)
from lshmoe.seeding import generator
from lshmoe.testing import run_ranks


def test_grap_gate_is_orthogonal_and_a_slice_mean():
    gate = GrAPGate(12, 4).double()
    W = gate.weight
    gram = W @ W.t()
    assert torch.allclose(gram, torch.diag(torch.diag(gram))) and torch.all(torch.diag(gram) > 0)
    with torch.no_grad():
        gate.bias.copy_(torch.tensor([0.5, -9.0, 0.0, 0.1], dtype=torch.float64))
    x = torch.randn(5, 12, generator=generator(1), dtype=torch.float64)
    want = torch.relu(x.view(5, 4, 3).mean(-1) + gate.bias)
    assert torch.allclose(gate(x), want, atol=1e-14)
    assert "weight" not in dict(gate.named_parameters()), "GrAP's gate vectors are fixed"


def test_locality_loss_is_finite_and_zero_only_when_all_mass_is_local():
    local = torch.tensor([True, True, False, False])
    probs = torch.softmax(torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 2.0]], dtype=torch.float64), -1)
    assert locality_loss(probs, local).item() == pytest.approx(-math.log(probs.mean(0)[:2].sum().item()))
    extreme = torch.softmax(torch.tensor([[-1e4, -1e4, 0.0, 0.0]], dtype=torch.float64), -1)  # local mass underflows
    assert math.isfinite(locality_loss(extreme, local).item())
    all_local = torch.tensor([[0.7, 0.3, 0.0, 0.0]], dtype=torch.float64)
    assert locality_loss(all_local, local).item() == 0.0
    logits = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    locality_loss(torch.softmax(logits, -1), local).backward()
    assert torch.all(logits.grad[:, :2] < 0) and torch.all(logits.grad[:, 2:] > 0), "descent moves mass local"


def test_node_limited_routing_never_exceeds_g_nodes():
    node_of_E = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    probs = torch.softmax(torch.randn(200, 8, generator=generator(2)), -1)
    for g, k in ((1, 2), (2, 4), (3, 4)):  # g nodes hold 2g experts >= k
        allowed = node_limited_mask(probs, node_of_E, g)
        top = torch.topk(probs.masked_fill(~allowed, -1.0), k, dim=-1).indices
        nodes_per_token = torch.tensor([len(set(node_of_E[t].tolist())) for t in top])
        assert int(nodes_per_token.max()) <= g
        best = probs.argmax(-1)
        assert torch.all(allowed.gather(1, best[:, None])), "the best expert's node is always kept"
    assert node_limited_mask(probs, node_of_E, 4).all()


def test_capacity_bound_matches_closed_forms_and_the_papers_table():
    for x in (0.05, 0.3, 0.8):
        assert betainc(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), rel=1e-12)
        assert betainc(3.0, 1.0, x) == pytest.approx(x**3, rel=1e-12)
    for d, (p_want, ec_want) in {768: (0.41, 0.15), 2048: (0.17, 0.36), 5120: (0.032, 1.97)}.items():
        p, ec = capacity_lower_bound(0.03, d, 16)
        assert p == pytest.approx(p_want, abs=0.01) and ec == pytest.approx(ec_want, abs=0.02)
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])  # cosines to w_0: 1, 0.707, 0.447
    assert measured_delta(x, torch.eye(2), torch.tensor([0, 0, 0])) == pytest.approx(math.cos(math.pi / 4))


def test_config_rules():
    with pytest.raises(ConfigError, match="divisible by moe.num_experts"):
        validate(Config(model=ModelConfig(d_model=30, n_heads=2), moe=MoEConfig(num_experts=4, router="locmoe")))
    with pytest.raises(ConfigError, match="hierarchical needs the expert-parallel group to be the world"):
        validate(Config(moe=MoEConfig(num_experts=4, a2a="hierarchical", ep_size=2)), world_size=4)


# ----------------------------------------------------------------------------------- 2 nodes x 2 ranks

ROUTES = {0: [0, 0, 1, 2, 3, 3, 3, 1], 1: [2, 0, 1, 1, 3], 2: [3, 3, 0], 3: [1, 2, 2, 0, 0, 3]}  # expert per token


def _hier_worker(comm, cases):
    out = []
    for _name, kind, top_k in cases:
        cfg = MoEConfig(num_experts=8, top_k=top_k, d_expert=5, activation="swiglu", a2a=kind)
        layer = MoELayer(cfg, D, comm, layer_id=0).double()
        init_layer(layer, cfg)
        x, cot = rank_input(comm.rank, 7 + 3 * comm.rank, starve=comm.rank == 2)
        x.requires_grad_(True)
        comm.ledger.end_step()
        o = layer(x)
        ((o.y_TD * cot).sum() + 0.1 * o.aux["load_balance"]).backward()
        step = comm.ledger.end_step()
        out.append(
            {
                "y": o.y_TD.detach(),
                "gx": x.grad,
                "g": {n: p.grad for n, p in layer.named_parameters()},
                "inter": step.inter_node_bytes,
                "local": o.stats.get("rows_local"),
            }
        )
    return out


@pytest.mark.slow
def test_hierarchical_equals_flat_at_2_nodes_x_2_ranks():
    cases = [
        ("flat-top2", "flat", 2),
        ("hier-top2", "hierarchical", 2),
        ("flat-top1", "flat", 1),
        ("hier-top1", "hierarchical", 1),
    ]
    results = run_ranks(_hier_worker, 4, cases, ranks_per_node=2, timeout_s=60)
    for res in results:
        for flat, hier in ((res[0], res[1]), (res[2], res[3])):
            assert (flat["y"] - hier["y"]).abs().max() <= EXACT
            assert (flat["gx"] - hier["gx"]).abs().max() <= EXACT
            for n, g in flat["g"].items():
                assert (g - hier["g"][n]).abs().max() <= EXACT, n
            assert flat["local"] is not None and flat["local"] == hier["local"]


def _bytes_worker(comm, kind):
    cfg = MoEConfig(num_experts=4, top_k=1, d_expert=4, a2a=kind)
    layer = MoELayer(cfg, 8, comm, layer_id=0).double()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :4] = 10 * torch.eye(4, dtype=torch.float64)
        layer.experts.reset_parameters(0, 0, 0.3, 0.3)
    x = torch.zeros(len(ROUTES[comm.rank]), 8, dtype=torch.float64)
    for t, e in enumerate(ROUTES[comm.rank]):
        x[t, e] = 5.0
    comm.ledger.end_step()
    o = layer(x.requires_grad_(True))
    o.y_TD.sum().backward()
    step = comm.ledger.end_step()
    return {"inter": step.inter_node_bytes, "intra": step.intra_node_bytes, "local": o.stats["rows_local"]}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["flat", "hierarchical"])
def test_bytes_per_link_class_match_a_fixed_routing(kind):
    results = run_ranks(_bytes_worker, 4, kind, ranks_per_node=2, timeout_s=60)
    row = 8 * 8
    node = lambda r: r // 2  # noqa: E731
    sends = {r: {q: sum(1 for e in ROUTES[r] if e == q) for q in range(4)} for r in range(4)}  # one expert per rank
    for r, res in enumerate(results):
        assert res["local"] == sum(n for q, n in sends[r].items() if node(q) == node(r))
        if kind == "flat":
            # dispatch sends my rows, combine returns what I received; backward repeats both
            inter = sum(sends[r][q] + sends[q][r] for q in range(4) if node(q) != node(r))
            intra = sum(sends[r][q] + sends[q][r] for q in range(4) if node(q) == node(r) and q != r)
        else:
            lane, mate = r % 2, r ^ 1
            # phase A: to my node-mate, every row bound for its lane (either node); phase B: to my lane
            # peer on the other node, every row from my node bound for it
            phase_a = sum(sends[r][q] for q in range(4) if q % 2 == mate % 2)
            phase_a_in = sum(sends[mate][q] for q in range(4) if q % 2 == lane)
            peer = (r + 2) % 4
            phase_b = sum(sends[s][peer] for s in range(4) if node(s) == node(r))
            phase_b_in = sum(sends[s][r] for s in range(4) if node(s) == node(peer))
            intra, inter = phase_a + phase_a_in, phase_b + phase_b_in
        # count metadata: flat exchanges one int64 per (peer, local expert); hierarchical all-gathers the
        # four int64 expert counts to every peer
        meta_inter, meta_intra = (2 * 8, 1 * 8) if kind == "flat" else (2 * 32, 1 * 32)
        assert res["inter"] == 2 * inter * row + meta_inter, (r, res, inter)
        assert res["intra"] == 2 * intra * row + meta_intra, (r, res, intra)


def _node_bias_worker(comm):
    from lshmoe.models.gpt import GPTMoE
    from lshmoe.moe.param_kinds import is_node_param
    from lshmoe.train.grad_sync import GradSync

    cfg = Config(
        model=ModelConfig(d_model=16, n_layers=2, n_heads=2, seq_len=6, moe_every=1),
        moe=MoEConfig(num_experts=4, top_k=2, d_expert=12, capacity_factor=1.0),
        locmoe=LocMoEConfig(node_bias=True, locality_weight=0.1),
    )
    model = GPTMoE(cfg.model, cfg.moe, 50, comm, settings=cfg).double()
    model.reset_parameters(11)
    ids = torch.randint(0, 50, (2, 7), generator=generator(3, "batch", comm.rank))
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters() if is_node_param(p)}
    sync = GradSync(model, comm)
    sync.sync()
    return {
        "node": model.my_node,
        "raw": raw,
        "norm": float(sync.global_norm()),
        "synced": {n: p.grad.clone() for n, p in model.named_parameters() if is_node_param(p)},
    }


@pytest.mark.slow
def test_node_bias_gradients_are_reduced_within_the_node_only():
    """2 nodes x 2 ranks, float64: each node's bias gets the sum of its own ranks' gradients / W."""
    res = run_ranks(_node_bias_worker, 4, ranks_per_node=2, timeout_s=60)
    names = list(res[0]["raw"])
    assert names and all(n.endswith("router.node_bias") for n in names)
    assert [r["node"] for r in res] == [0, 0, 1, 1]
    for r in res:
        for n in names:
            want = sum(q["raw"][n] for q in res if q["node"] == r["node"]) / 4
            assert torch.allclose(r["synced"][n], want, rtol=0, atol=EXACT)
    assert not torch.equal(res[0]["synced"][names[0]], res[2]["synced"][names[0]])
    assert len({r["norm"] for r in res}) == 1, "every rank clips by the same global norm"
