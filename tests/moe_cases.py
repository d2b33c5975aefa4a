"""Builders shared by the MoE tests: deterministic layers, inputs and the matching reference."""

from __future__ import annotations

import torch

from lshmoe.config import MoEConfig
from lshmoe.moe.experts import GroupedExperts
from lshmoe.seeding import generator

D = 6
SEED = 7


def init_layer(layer, cfg: MoEConfig, seed: int = SEED) -> None:
    """Same weights on every rank and in the reference: router from one generator, experts per id."""
    g = generator(seed, "router")
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g, dtype=torch.float64))
        if cfg.activation == "identity":
            return
        layer.experts.reset_parameters(seed, layer.layer_id, 0.6, 0.6)


def full_expert_params(cfg: MoEConfig, d_model: int, layer_id: int = 0, seed: int = SEED) -> dict:
    ex = GroupedExperts(cfg.num_experts, d_model, cfg.d_expert, cfg.activation, first_expert=0).double()
    ex.reset_parameters(seed, layer_id, 0.6, 0.6)
    return {n: p.detach().clone().requires_grad_(True) for n, p in ex.named_parameters()}


def router_weight(cfg: MoEConfig, d_model: int, seed: int = SEED) -> torch.Tensor:
    g = generator(seed, "router")
    return torch.randn(cfg.num_experts, d_model, generator=g, dtype=torch.float64).requires_grad_(True)


def rank_input(rank: int, tokens: int, starve: bool, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and upstream gradient of one rank. `starve` makes the last expert unreachable."""
    g = generator(seed, "x", rank)
    x = torch.randn(tokens, D, generator=g, dtype=torch.float64)
    if starve:
        x[:, 0] = x[:, 0].abs() + 4.0
    cot = torch.randn(tokens, D, generator=g, dtype=torch.float64)
    return x, cot


def starve_router(weight: torch.Tensor) -> None:
    """Give the last expert a huge negative weight on feature 0 (always > 4 when starving)."""
    with torch.no_grad():
        weight[-1, 0] = -50.0
