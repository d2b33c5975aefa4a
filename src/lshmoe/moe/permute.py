"""Local permutation: group routed rows by destination expert, and undo it with the gate weights.

Experts are numbered so that expert e lives on EP rank e // (E / W); sorting the kept assignments
by expert id therefore also groups them by destination rank, which is the layout the uneven-split
all-to-all needs. `perm_N` indexes the flattened [T*K] assignments; row n of the permuted buffer
is token perm_N[n] // K.
"""

from __future__ import annotations

import torch


def sort_by_expert(
    topk_ids_TK: torch.Tensor, num_experts: int, keep_TK: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (perm_N, counts_E): kept assignments in expert order, and rows per expert."""
    ids_A = topk_ids_TK.reshape(-1)
    if keep_TK is None:
        perm_N = torch.sort(ids_A, stable=True).indices
    else:
        kept_N = torch.nonzero(keep_TK.reshape(-1), as_tuple=True)[0]
        perm_N = kept_N[torch.sort(ids_A[kept_N], stable=True).indices]
    counts_E = torch.bincount(ids_A[perm_N], minlength=num_experts)
    return perm_N, counts_E


def permute_rows(x_TD: torch.Tensor, perm_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows of the permuted buffer: one copy of the token per kept assignment."""
    return x_TD.index_select(0, perm_N // top_k)


def unpermute_combine(
    y_ND: torch.Tensor, perm_N: torch.Tensor, weights_TK: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """y_TD[t] = sum over kept (t, k) of weights_TK[t, k] * y_ND[row of (t, k)]."""
    top_k = weights_TK.shape[-1]
    w_N = weights_TK.reshape(-1).index_select(0, perm_N).to(y_ND.dtype)
    out_TD = y_ND.new_zeros((num_tokens, y_ND.shape[-1]))
    return out_TD.index_add(0, perm_N // top_k, y_ND * w_N[:, None])
