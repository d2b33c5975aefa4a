"""Index arithmetic every floor of the package shares (imports torch only).

`inverse_permutation` undoes a row permutation: the MoE layer's dispatchers regroup received rows
with it, and the LSH compressor's restore-error probe unsorts its sampled rows; it lives here, below
both, so neither imports the other.
"""

from __future__ import annotations

import torch


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv with inv[perm[i]] = i: undoes `x.index_select(0, perm)`."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv
