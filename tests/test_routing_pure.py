"""Router losses, capacity/dropping semantics and permutation, as pure functions (no processes)."""

from __future__ import annotations

import math

import torch

from lshmoe.config import MoEConfig
from lshmoe.distributed.comm import Comm
from lshmoe.moe.capacity import capacity_keep_mask, expert_capacity
from lshmoe.moe.layer import MoELayer
from lshmoe.moe.permute import permute_rows, sort_by_expert, unpermute_combine
from lshmoe.moe.router import TopKRouter


def test_capacity_formula():
    assert expert_capacity(num_tokens=4, num_experts=2, top_k=1, capacity_factor=1.0) == 2
    assert expert_capacity(num_tokens=3, num_experts=2, top_k=1, capacity_factor=1.0) == 2  # ceil(1.5)
    assert expert_capacity(num_tokens=10, num_experts=4, top_k=2, capacity_factor=1.25) == 7  # ceil(6.25)
    assert expert_capacity(num_tokens=1, num_experts=64, top_k=1, capacity_factor=0.1) == 1  # floor of 1


def test_capacity_drops_lowest_probability_first():
    # Expert 0 is claimed by tokens 0 (p=.9), 1 (p=.6), 2 (p=.7); capacity 2 drops token 1.
    ids = torch.tensor([[0], [0], [0], [1]])
    probs = torch.tensor([[0.9], [0.6], [0.7], [0.8]])
    keep = capacity_keep_mask(ids, probs, num_experts=2, capacity=2)
    assert keep.view(-1).tolist() == [True, False, True, True]


def test_capacity_ties_drop_the_later_token():
    ids = torch.tensor([[0], [0], [0]])
    probs = torch.full((3, 1), 0.5)
    keep = capacity_keep_mask(ids, probs, num_experts=2, capacity=2)
    assert keep.view(-1).tolist() == [True, True, False]


def test_capacity_top2_counts_every_slot():
    # token 0: e0 (.7), e1 (.3); token 1: e1 (.6), e0 (.4); capacity 1 per expert.
    ids = torch.tensor([[0, 1], [1, 0]])
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    keep = capacity_keep_mask(ids, probs, num_experts=2, capacity=1)
    assert keep.tolist() == [[True, False], [True, False]]


def test_layer_drops_and_reports_on_hand_example():
    """Identity experts, top-1: y_t = x_t if its assignment is kept, else 0; dropped count reported."""
    cfg = MoEConfig(num_experts=2, top_k=1, activation="identity", capacity_factor=1.0)
    layer = MoELayer(cfg, 2, Comm.local(), layer_id=0).double()
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # Three tokens prefer expert 0 (margins 3, 1, 2) and one prefers expert 1: capacity 2 drops the margin-1 token.
    x = torch.tensor([[3.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    out = layer(x)
    p = torch.softmax(x @ layer.router.weight.t(), -1).max(-1).values
    expected = x * p[:, None]
    expected[1] = 0
    assert torch.allclose(out.y_TD, expected, atol=1e-12, rtol=0)
    assert int(out.dropped) == 1
    assert out.tokens_per_expert_E.tolist() == [2, 1]


def test_load_balance_and_z_loss_values():
    E, D, T = 4, 3, 16
    router = TopKRouter(D, E, 2)
    with torch.no_grad():
        router.weight.zero_()
    out = router(torch.randn(T, D))
    # A uniform router: every probability is 1/E, so E * sum_e f_e / E = 1, and logsumexp(0) = log E.
    assert math.isclose(float(out.aux["load_balance"].detach()), 1.0, rel_tol=1e-6)
    assert math.isclose(float(out.aux["z_loss"].detach()), math.log(E) ** 2, rel_tol=1e-6)
    # A router that sends everything to expert 0 with probability ~1 approaches the maximum E (top-1).
    router1 = TopKRouter(D, E, 1)
    with torch.no_grad():
        router1.weight.zero_()
        router1.weight[0, 0] = 100.0
    x = torch.randn(T, D).abs() + 1
    assert float(router1(x).aux["load_balance"].detach()) > E - 1e-3


def test_topk_weights_normalised():
    router = TopKRouter(5, 6, 3)
    with torch.no_grad():
        router.weight.normal_()
    out = router(torch.randn(7, 5))
    assert torch.allclose(out.weights_TK.sum(-1), torch.ones(7))
    assert out.topk_ids_TK.unique(dim=-1).shape[-1] == 3


def test_permute_roundtrip_and_grouping():
    T, K, E = 9, 2, 4
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    perm, counts = sort_by_expert(ids, E)
    assert counts.tolist() == torch.bincount(ids.view(-1), minlength=E).tolist()
    assert torch.all(ids.view(-1)[perm][1:] >= ids.view(-1)[perm][:-1]), "rows must be grouped by expert"
    x = torch.randn(T, 5, dtype=torch.float64)
    rows = permute_rows(x, perm, K)
    w = torch.full((T, K), 1.0 / K, dtype=torch.float64)
    assert torch.allclose(unpermute_combine(rows, perm, w, T), x, atol=1e-12)
