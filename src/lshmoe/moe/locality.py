"""Locality-aware routing (LocMoE, IJCAI 2024): GrAP gate, locality loss, node-limited routing, and
the paper's capacity lower bound. Pure functions and one module; the topology enters as a map from
expert to node and the node of this rank.

GrAP gate. Expert i's logit is ReLU(mean of the i-th contiguous D/E slice of x + eps_i): fixed,
mutually orthogonal gate vectors w_i = (E/D) 1[slice i] and an optional learnable bias eps.

Locality loss. The paper's KL(D_c || D_l) is infinite whenever the batch puts mass on an expert the
node-local distribution D_l gives none. We use
    L_loc = -log sum_{i local} P_i ,   P = mean router probability of this rank's tokens,
which is the KL divergence from P restricted to the node-local experts (renormalised) to P: finite
for any softmax router, zero exactly when all router mass is on node-local experts, and its gradient
moves mass towards them without preferring one local expert over another (the balance loss does that).

Node-limited routing (the group-limited top-k of DeepSeek-V3 / torchtitan / Megatron): score each
node by its best expert's probability, keep the g best nodes per token, and take the top-k experts
among their experts only.

Capacity bound (Theorem 1). If tokens are uniform on the unit sphere and a token belongs to expert i
when cos(x, w_i) >= delta, expert i receives a share p_delta = 1 - I_{delta^2}(1/2, (d-1)/2) of the
tokens (I = regularised incomplete beta); the minimum capacity is ec_min = 1 / (n p_delta).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GrAPGate(nn.Module):
    """Fixed orthogonal slice-mean gate with an optional learnable bias: logits_TE = ReLU(x W^T + eps)."""

    def __init__(self, d_model: int, num_experts: int, learnable_bias: bool = True):
        super().__init__()
        assert d_model % num_experts == 0, "GrAP needs model width divisible by the number of experts"
        w = torch.zeros(num_experts, d_model)
        span = d_model // num_experts
        for i in range(num_experts):
            w[i, i * span : (i + 1) * span] = 1.0 / span
        self.register_buffer("weight", w, persistent=False)  # fixed, not a parameter
        self.bias = nn.Parameter(torch.zeros(num_experts)) if learnable_bias else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits = x_TD @ self.weight.to(x_TD.dtype).t()
        if self.bias is not None:
            logits = logits + self.bias.to(x_TD.dtype)
        return torch.relu(logits)


def locality_loss(probs_TE: torch.Tensor, local_E: torch.Tensor) -> torch.Tensor:
    """-log of the router mass on node-local experts (see the module docstring); `local_E` is a bool mask."""
    if probs_TE.shape[0] == 0:
        return probs_TE.sum() * 0
    mass = probs_TE.mean(0)[local_E].sum()
    return -torch.log(mass.clamp_min(torch.finfo(probs_TE.dtype).tiny))


def node_limited_mask(probs_TE: torch.Tensor, node_of_E: torch.Tensor, limit: int) -> torch.Tensor:
    """Bool [T, E]: the experts a token may use when it may reach at most `limit` nodes."""
    num_nodes = int(node_of_E.max()) + 1
    if limit >= num_nodes:
        return torch.ones_like(probs_TE, dtype=torch.bool)
    node_score_TN = torch.full((probs_TE.shape[0], num_nodes), -1.0, dtype=probs_TE.dtype, device=probs_TE.device)
    node_score_TN = node_score_TN.scatter_reduce(1, node_of_E.expand_as(probs_TE), probs_TE, reduce="amax")
    keep_nodes_TN = torch.zeros_like(node_score_TN, dtype=torch.bool).scatter_(
        1, torch.topk(node_score_TN, limit, dim=-1).indices, True
    )
    return keep_nodes_TN.gather(1, node_of_E.expand(probs_TE.shape[0], -1))


# ------------------------------------------------------------------------------------------ capacity bound


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, as in Numerical Recipes)."""
    tiny = 1e-300

    def nz(v: float) -> float:
        return v if abs(v) > tiny else tiny

    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 / nz(1.0 - qab * x / qap)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d, c = 1.0 / nz(1.0 + aa * d), nz(1.0 + aa / c)
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d, c = 1.0 / nz(1.0 + aa * d), nz(1.0 + aa / c)
        h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _betacf(b, a, 1.0 - x) / b


def capacity_lower_bound(delta: float, d_model: int, num_experts: int) -> tuple[float, float]:
    """(p_delta, ec_min) of LocMoE's Theorem 1 for angular threshold `delta` (a cosine)."""
    p = 1.0 - betainc(0.5, (d_model - 1) / 2.0, delta * delta)
    return p, 1.0 / (num_experts * p)


def measured_delta(x_TD: torch.Tensor, gate_ED: torch.Tensor, chosen_T: torch.Tensor) -> float:
    """The median cosine between each token and the gate vector of the expert it was routed to."""
    if x_TD.shape[0] == 0:
        return float("nan")
    w = gate_ED[chosen_T].to(x_TD.dtype)
    cos = torch.nn.functional.cosine_similarity(x_TD, w, dim=-1)
    return float(cos.median())
