"""Expert capacity and token dropping (pure functions).

With a capacity factor cf, each expert accepts at most C = ceil(cf * T * K / E) of the T*K
assignments made on this rank (T local tokens). When more arrive, the assignments with the lowest
router probability are dropped first; among equal probabilities the later assignment (in token-major
order t*K + k) is dropped first. A dropped assignment contributes nothing to its token's output
(the residual stream carries the token past the layer). Without a capacity factor the layer is
dropless.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ceil(cf * T * K / E); at least 1 so that every expert can take a token."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_keep_mask(
    topk_ids_TK: torch.Tensor, topk_probs_TK: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Boolean [T, K] mask of the assignments each expert keeps under `capacity`."""
    ids_A = topk_ids_TK.reshape(-1)
    probs_A = topk_probs_TK.reshape(-1)
    # Order by (expert asc, prob desc, flat position asc): two stable sorts, the later key first.
    by_prob_A = torch.sort(probs_A, descending=True, stable=True).indices
    order_A = by_prob_A[torch.sort(ids_A[by_prob_A], stable=True).indices]
    counts_E = torch.bincount(ids_A, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    slot_A = torch.arange(ids_A.numel(), device=ids_A.device) - starts_E[ids_A[order_A]]
    keep_A = torch.empty_like(ids_A, dtype=torch.bool)
    keep_A[order_A] = slot_A < capacity
    return keep_A.view_as(topk_ids_TK)
