"""Path profiles: how a token's earlier expert choices predict its next one (Lina, §5.2).

Shapes: L MoE layers, T tokens, E experts, P distinct paths, n path length.

A token's *path* before MoE layer i is the tuple of its top-1 experts in the previous n = min(l, i)
MoE layers (l = 3 by default; the first layers have shorter paths, layer 0 the empty one). Profiled
offline on training data, `PathProfile` holds for every layer i and every n = 0..min(l, i) the
distribution of layer i's top-1 expert given the last n experts of the path. Paths are encoded as
integers, code = sum_j ids[j] * E**j (oldest layer first), so a table is a sorted key vector and a
[P, E] probability matrix, looked up with `searchsorted`.

The distribution is that of layer i's top-1 expert (the paper's profile). With `routes_LTK` (every
routed expert of each token, K per token) it is instead the distribution of layer i's routed rows,
each of a token's K routes weighing 1/K: the share of the layer's load, which is what placement
balances when K > 1 (a top-1 profile credits all of a token's load to its first expert).

Estimating a batch: each token takes the distribution of its full path; a path never seen in
profiling backs off to its longest seen suffix (the n most recent experts), down to n = 0, the
layer's overall top-1 distribution. Each token's distribution keeps only its `top_k` largest entries
(ties: the lower expert id), the others become 0, and the popularity estimate is the mean over tokens.
It is not renormalised; the planner normalises whatever it is given.

Expert rankings everywhere (`top_experts`) sort by value descending, ties by the lower expert id, so
every rank ranks identical numbers identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_PATH_LEN = 3


@dataclass(frozen=True, slots=True)
class PathTable:
    """Layer i's top-1 distribution given paths of one length."""

    keys_P: torch.Tensor  # int64 path codes, ascending
    probs_PE: torch.Tensor  # float64, rows sum to 1
    tokens_P: torch.Tensor  # int64 profiled tokens per path (how much each row is worth)


@dataclass(frozen=True, slots=True)
class PathProfile:
    """Every layer's tables: `tables[i][n]` conditions layer i on the last n experts of the path."""

    num_experts: int
    path_len: int
    tables: tuple[tuple[PathTable, ...], ...]

    @property
    def num_layers(self) -> int:
        return len(self.tables)


def encode_paths(path_TN: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Integer code of each row's path (column 0 = the oldest layer); an empty path is code 0."""
    T, n = path_TN.shape
    if num_experts**n >= 2**62:
        raise ValueError(f"paths of {n} layers over {num_experts} experts do not fit an int64 code")
    place_N = num_experts ** torch.arange(n, dtype=torch.int64)
    return (path_TN.to(torch.int64) * place_N).sum(1) if n else torch.zeros(T, dtype=torch.int64)


def _table(codes_T: torch.Tensor, next_TK: torch.Tensor, num_experts: int) -> PathTable:
    """Counts of each path's next experts (a token's K entries weigh 1/K each), normalised per path."""
    keys_P, inverse_T = torch.unique(codes_T, sorted=True, return_inverse=True)
    T, K = next_TK.shape
    counts_PE = torch.zeros(keys_P.numel(), num_experts, dtype=torch.float64)
    counts_PE.index_put_(
        (inverse_T.repeat_interleave(K), next_TK.reshape(-1).to(torch.int64)),
        torch.full((T * K,), 1.0 / K, dtype=torch.float64),
        accumulate=True,
    )
    tokens_P = torch.bincount(inverse_T, minlength=keys_P.numel())
    return PathTable(keys_P=keys_P, probs_PE=counts_PE / tokens_P[:, None], tokens_P=tokens_P)


def build_profile(
    top1_LT: torch.Tensor, num_experts: int, path_len: int = DEFAULT_PATH_LEN, routes_LTK: torch.Tensor | None = None
) -> PathProfile:
    """Profile recorded routing: `top1_LT[i, t]` is token t's top-1 expert in MoE layer i (its path);
    the predicted quantity is that top-1 expert, or with `routes_LTK` the token's K routed experts."""
    L, T = top1_LT.shape
    if T == 0:
        raise ValueError("a path profile needs at least one token")
    ids_TL = top1_LT.to(torch.int64).t()
    tables = []
    for i in range(L):
        next_TK = ids_TL[:, i : i + 1] if routes_LTK is None else routes_LTK[i].to(torch.int64)
        tables.append(
            tuple(
                _table(encode_paths(ids_TL[:, i - n : i], num_experts), next_TK, num_experts)
                for n in range(min(path_len, i) + 1)
            )
        )
    return PathProfile(num_experts=num_experts, path_len=path_len, tables=tuple(tables))


def truncate_top_k(dist_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep each row's `top_k` largest entries (ties: the lower expert id), zero the rest."""
    if top_k >= dist_TE.shape[-1]:
        return dist_TE
    order_TE = torch.sort(dist_TE, dim=-1, descending=True, stable=True).indices
    keep_TE = torch.zeros_like(dist_TE, dtype=torch.bool).scatter_(-1, order_TE[:, :top_k], True)
    return dist_TE.masked_fill(~keep_TE, 0.0)


def path_distribution(profile: PathProfile, layer: int, history_TH: torch.Tensor, top_k: int = 2) -> torch.Tensor:
    """Each token's predicted top-1 distribution for MoE layer `layer`, truncated to `top_k` experts.

    `history_TH` holds the token's top-1 experts in MoE layers 0..layer-1 (H >= layer columns; only the
    last min(l, layer) of the first `layer` columns are used)."""
    E = profile.num_experts
    T = history_TH.shape[0]
    tables = profile.tables[layer]
    dist_TE = torch.zeros(T, E, dtype=torch.float64)
    todo_T = torch.ones(T, dtype=torch.bool)
    for n in range(len(tables) - 1, -1, -1):
        idx_U = torch.nonzero(todo_T, as_tuple=True)[0]
        if idx_U.numel() == 0:
            break
        table = tables[n]
        codes_U = encode_paths(history_TH[idx_U, layer - n : layer], E)
        pos_U = torch.searchsorted(table.keys_P, codes_U).clamp(max=max(0, table.keys_P.numel() - 1))
        found_U = table.keys_P[pos_U] == codes_U if table.keys_P.numel() else torch.zeros_like(codes_U, dtype=bool)
        hit_U = idx_U[found_U]
        dist_TE[hit_U] = table.probs_PE[pos_U[found_U]]
        todo_T[hit_U] = False
    if bool(todo_T.any()):  # no table at all (cannot happen for a profile of >= 1 token): uniform
        dist_TE[todo_T] = 1.0 / E
    return truncate_top_k(dist_TE, top_k)


def estimate_popularity(profile: PathProfile, layer: int, history_TH: torch.Tensor, top_k: int = 2) -> torch.Tensor:
    """p_hat(e) = mean over tokens of the truncated path distribution (float64 [E]; zeros for no tokens)."""
    dist_TE = path_distribution(profile, layer, history_TH, top_k)
    return dist_TE.mean(0) if dist_TE.shape[0] else dist_TE.new_zeros(profile.num_experts)


def top_experts(popularity_E: torch.Tensor, k: int = 2) -> tuple[int, ...]:
    """The k most popular experts, most popular first; ties go to the lower expert id."""
    order = torch.sort(popularity_E.to(torch.float64), descending=True, stable=True).indices
    return tuple(int(e) for e in order[:k])


def top_match(estimate_E: torch.Tensor, actual_E: torch.Tensor, k: int = 2, ordered: bool = False) -> bool:
    """Does the estimate name the same top-k experts as the actual load (as a set, or in order)?"""
    est, act = top_experts(estimate_E, k), top_experts(actual_E, k)
    return est == act if ordered else set(est) == set(act)


def layer_accuracy(
    profile: PathProfile,
    top1_LT: torch.Tensor,
    counts_LE: torch.Tensor | None = None,
    top_k: int = 2,
    k: int = 2,
    ordered: bool = False,
) -> list[bool]:
    """Per layer: does the estimate from the recorded paths match the actual top-k experts?

    `counts_LE` is each layer's actual load (rows per expert, all K routes); default: the top-1 counts."""
    L = top1_LT.shape[0]
    ids_TL = top1_LT.to(torch.int64).t()
    if counts_LE is None:
        counts_LE = torch.stack(
            [torch.bincount(top1_LT[i].to(torch.int64), minlength=profile.num_experts) for i in range(L)]
        )
    return [top_match(estimate_popularity(profile, i, ids_TL, top_k), counts_LE[i], k, ordered) for i in range(L)]
