"""`moe.grad_path = b`: the exact model with LSH's gradient-only identity path, y = E(x) + b (x -
stopgrad x) for every routed row, checked in float64 against the closed form: the forward and every
parameter gradient bitwise those of the plain layer, the input gradient + b (sum of the token's
kept gate weights) g_t."""

from __future__ import annotations

import pytest
import torch
from moe_cases import D, init_layer, rank_input

from lshmoe.config import Config, ConfigError, MoEConfig
from lshmoe.distributed.comm import Comm
from lshmoe.moe.layer import MoELayer

E, K, T = 4, 2, 23


def _run(b: float, capacity: float | None = None):
    cfg = MoEConfig(num_experts=E, top_k=K, d_expert=5, grad_path=b, capacity_factor=capacity)
    layer = MoELayer(cfg, D, Comm.local(), layer_id=0, settings=Config(moe=cfg)).double()
    init_layer(layer, cfg)
    x, cot = rank_input(0, T, starve=False)
    x = x.requires_grad_(True)
    out = layer(x)
    (out.y_TD * cot).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out, x.grad, grads, cot, layer


@pytest.mark.parametrize("b", [1.0, 0.3])
@pytest.mark.parametrize("capacity", [None, 0.6], ids=["dropless", "drops"])
def test_grad_path_matches_the_closed_form(b, capacity):
    plain, g0, p0, cot, _ = _run(0.0, capacity)
    path, g1, p1, _, layer = _run(b, capacity)
    assert torch.equal(plain.y_TD, path.y_TD), "the forward is exact"
    assert p0.keys() == p1.keys() and all(torch.equal(p0[n], p1[n]) for n in p0), "parameter gradients unchanged"
    # the closed form: each kept (token, expert) row adds b * weight * g_t to its token's input gradient
    route = layer.router(layer_input := rank_input(0, T, starve=False)[0])
    perm_N, _, _ = layer.group_rows(layer_input, route)
    w_N = route.weights_TK.reshape(-1).index_select(0, perm_N).detach()
    kept_w_T = torch.zeros(T, dtype=torch.float64).index_add_(0, perm_N // K, w_N)
    torch.testing.assert_close(g1 - g0, b * kept_w_T[:, None] * cot, rtol=0, atol=1e-12)
    if capacity is None:
        torch.testing.assert_close(kept_w_T, torch.ones(T, dtype=torch.float64), rtol=0, atol=1e-12)
    else:
        assert float(kept_w_T.min()) < 1.0, "the check sees dropped rows"


def test_grad_path_is_refused_with_dedup():
    with pytest.raises(ConfigError, match=r"moe.grad_path=1.0 needs moe.a2a=flat or hierarchical"):
        Config(moe=MoEConfig(grad_path=1.0, a2a="dedup"))


def test_grad_path_is_refused_with_another_compressor():  # it would otherwise be silently ignored
    with pytest.raises(ConfigError, match=r"moe.grad_path=1.0 needs moe.compress=identity \(got lsh\)"):
        MoEConfig(grad_path=1.0, compress="lsh")
