"""Token-choice top-k router with its auxiliary losses.

Shapes: T tokens, D model width, E experts, K experts per token.

    logits_TE = x_TD @ W_gate_ED^T            (in float32, or float64 for float64 inputs)
    probs_TE  = softmax(logits_TE)
    topk_probs_TK, topk_ids_TK = topk(probs_TE, K)
    weights_TK = topk_probs_TK / sum_k topk_probs_TK     (when normalize_weights; else the raw probs)

Auxiliary losses (returned unweighted; the model applies the configured weights), and with a
topology the locality loss of LocMoE (moe/locality.py):
- load balance (Switch Transformer / GShard): E * sum_e f_e * P_e, with f_e the fraction of the T*K
  assignments that chose expert e and P_e the mean router probability of e. It is 1 under a uniform
  router and grows as the load concentrates.
- z-loss (ST-MoE): mean_t logsumexp(logits_t)^2, which keeps the logits small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lshmoe.moe.locality import GrAPGate, locality_loss, node_limited_mask
from lshmoe.moe.param_kinds import ParamKind, mark


@dataclass(kw_only=True, slots=True)
class RouterOutput:
    topk_ids_TK: torch.Tensor  # int64 expert ids, best first
    topk_probs_TK: torch.Tensor  # router probabilities of the chosen experts (float32/64)
    weights_TK: torch.Tensor  # combine weights in the input dtype
    aux: dict[str, torch.Tensor]  # unweighted auxiliary losses


def router_math_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def load_balance_loss(probs_TE: torch.Tensor, topk_ids_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_e (fraction of assignments to e) * (mean probability of e)."""
    num_experts = probs_TE.shape[-1]
    if probs_TE.shape[0] == 0:
        return probs_TE.sum() * 0
    counts_E = torch.bincount(topk_ids_TK.reshape(-1), minlength=num_experts).to(probs_TE.dtype)
    f_E = counts_E / topk_ids_TK.numel()
    return num_experts * (f_E * probs_TE.mean(0)).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class TopKRouter(nn.Module):
    """Softmax top-k over a gate's logits; optional multiplicative jitter on the input while training.

    The gate is a learnable linear map (`gate="topk"`) or LocMoE's GrAP (`gate="locmoe"`). With a
    topology (`set_topology`), the router can add the locality loss and limit every token to the
    experts of at most `node_limit` nodes (moe/locality.py)."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        jitter: float = 0.0,
        normalize_weights: bool = True,
        gate: str = "topk",
        node_bias: bool = False,
    ):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.jitter, self.normalize_weights = jitter, normalize_weights
        if gate == "locmoe":
            self.grap = GrAPGate(d_model, num_experts)
        else:
            self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        # Per-node bias (ParamKind.NODE): the same on the ranks of one node, different between nodes.
        bias = mark(nn.Parameter(torch.zeros(num_experts)), ParamKind.NODE) if node_bias else None
        self.register_parameter("node_bias", bias)
        self.node_of_E: torch.Tensor | None = None
        self.local_E: torch.Tensor | None = None
        self.node_limit = 0

    def set_topology(self, node_of_E: torch.Tensor, my_node: int, node_limit: int, locality: bool) -> None:
        """Which node hosts each expert; enables the locality loss and/or node-limited routing."""
        self.node_of_E, self.node_limit = node_of_E, node_limit
        self.local_E = (node_of_E == my_node) if locality else None

    def gate_vectors(self) -> torch.Tensor:
        """The experts' gate vectors w_i [E, D] (LocMoE's capacity bound measures cos(x, w_i))."""
        return self.grap.weight if hasattr(self, "grap") else self.weight.detach()

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        math_dtype = router_math_dtype(x_TD)
        if hasattr(self, "grap"):
            return self.grap(x_TD.to(math_dtype))
        return x_TD.to(math_dtype) @ self.weight.to(math_dtype).t()

    def forward(self, x_TD: torch.Tensor, exclude_T: torch.Tensor | None = None) -> RouterOutput:
        """Route `x_TD`; `exclude_T` (expert id per token, or -1) bars one expert per token (DGMoE)."""
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        logits_TE = self.logits(x_TD)
        if self.node_bias is not None:
            logits_TE = logits_TE + self.node_bias.to(logits_TE.dtype)
        allowed_TE = None
        if self.node_limit > 0 and self.node_of_E is not None:
            allowed_TE = node_limited_mask(
                torch.softmax(logits_TE, -1), self.node_of_E.to(logits_TE.device), self.node_limit
            )
        local_E = None if self.local_E is None else self.local_E.to(logits_TE.device)
        return route(logits_TE, self.top_k, self.normalize_weights, x_TD.dtype, exclude_T, allowed_TE, local_E)


def route(
    logits_TE: torch.Tensor,
    top_k: int,
    normalize_weights: bool,
    out_dtype: torch.dtype,
    exclude_T: torch.Tensor | None = None,
    allowed_TE: torch.Tensor | None = None,
    local_E: torch.Tensor | None = None,
) -> RouterOutput:
    """Softmax top-k routing of precomputed logits (shared by every gate that produces logits).

    With `exclude_T`, a token's barred expert cannot be chosen (its next-ranked expert is); with
    `allowed_TE`, only the allowed experts can be; the weights stay the unmasked softmax probabilities
    of the chosen experts. With `local_E`, the locality loss is added to the auxiliary losses."""
    probs_TE = torch.softmax(logits_TE, dim=-1)
    select_TE = probs_TE if allowed_TE is None else probs_TE.masked_fill(~allowed_TE, -1.0)
    if exclude_T is not None:
        barred = (exclude_T >= 0)[:, None] & (
            torch.arange(probs_TE.shape[-1], device=probs_TE.device)[None, :] == exclude_T[:, None]
        )
        select_TE = select_TE.masked_fill(barred, -1.0)
    topk_ids_TK = torch.topk(select_TE, top_k, dim=-1).indices
    topk_probs_TK = probs_TE.gather(-1, topk_ids_TK)
    weights_TK = topk_probs_TK
    if normalize_weights and top_k > 1:
        weights_TK = topk_probs_TK / topk_probs_TK.sum(-1, keepdim=True)
    aux = {"load_balance": load_balance_loss(probs_TE, topk_ids_TK), "z_loss": z_loss(logits_TE)}
    if local_E is not None:
        aux["locality"] = locality_loss(probs_TE, local_E)
    return RouterOutput(
        topk_ids_TK=topk_ids_TK, topk_probs_TK=topk_probs_TK.detach(), weights_TK=weights_TK.to(out_dtype), aux=aux
    )
