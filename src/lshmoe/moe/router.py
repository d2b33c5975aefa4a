"""Token-choice top-k router with its auxiliary losses.

Shapes: T tokens, D model width, E experts, K experts per token.

    logits_TE = x_TD @ W_gate_ED^T            (in float32, or float64 for float64 inputs)
    probs_TE  = softmax(logits_TE)
    topk_probs_TK, topk_ids_TK = topk(probs_TE, K)
    weights_TK = topk_probs_TK / sum_k topk_probs_TK     (when normalize_weights; else the raw probs)

Auxiliary losses (returned unweighted; the model applies the configured weights):
- load balance (Switch Transformer / GShard): E * sum_e f_e * P_e, with f_e the fraction of the T*K
  assignments that chose expert e and P_e the mean router probability of e. It is 1 under a uniform
  router and grows as the load concentrates.
- z-loss (ST-MoE): mean_t logsumexp(logits_t)^2, which keeps the logits small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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
    """Linear gate, softmax, top-k; optional multiplicative jitter on the input while training."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, jitter: float = 0.0,
                 normalize_weights: bool = True):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.jitter, self.normalize_weights = jitter, normalize_weights
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))

    def forward(self, x_TD: torch.Tensor, exclude_T: torch.Tensor | None = None) -> RouterOutput:
        """Route `x_TD`; `exclude_T` (expert id per token, or -1) bars one expert per token (DGMoE)."""
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        math_dtype = router_math_dtype(x_TD)
        logits_TE = x_TD.to(math_dtype) @ self.weight.to(math_dtype).t()
        return route(logits_TE, self.top_k, self.normalize_weights, x_TD.dtype, exclude_T)


def route(logits_TE: torch.Tensor, top_k: int, normalize_weights: bool, out_dtype: torch.dtype,
          exclude_T: torch.Tensor | None = None) -> RouterOutput:
    """Softmax top-k routing of precomputed logits (shared by every gate that produces logits).

    With `exclude_T`, a token's barred expert cannot be chosen (its next-ranked expert is); the
    weights stay the unmasked softmax probabilities of the chosen experts."""
    probs_TE = torch.softmax(logits_TE, dim=-1)
    select_TE = probs_TE
    if exclude_T is not None:
        barred = (exclude_T >= 0)[:, None] & (torch.arange(probs_TE.shape[-1], device=probs_TE.device)[None, :]
                                              == exclude_T[:, None])
        select_TE = probs_TE.masked_fill(barred, -1.0)
    topk_ids_TK = torch.topk(select_TE, top_k, dim=-1).indices
    topk_probs_TK = probs_TE.gather(-1, topk_ids_TK)
    weights_TK = topk_probs_TK
    if normalize_weights and top_k > 1:
        weights_TK = topk_probs_TK / topk_probs_TK.sum(-1, keepdim=True)
    aux = {"load_balance": load_balance_loss(probs_TE, topk_ids_TK), "z_loss": z_loss(logits_TE)}
    return RouterOutput(topk_ids_TK=topk_ids_TK, topk_probs_TK=topk_probs_TK.detach(),
                        weights_TK=weights_TK.to(out_dtype), aux=aux)
