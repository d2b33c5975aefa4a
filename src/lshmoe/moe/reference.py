"""A naive single-process MoE: the same math as `MoELayer`, written the obvious way.

No permutation, no grouped matmul, no collectives: each token visits each chosen expert in a
Python loop, with capacity decided by an explicit per-expert ranking. The expert-parallel layer is
tested against this in float64 (output and every gradient), so the two implementations share
nothing but the config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lshmoe.config import MoEConfig


def expert_ffn(x_D: torch.Tensor, params: dict[str, torch.Tensor], e: int, activation: str) -> torch.Tensor:
    """One expert applied to one token, from the global (all-expert) parameter tensors."""
    if activation == "identity":
        return x_D
    if activation == "linear":
        return x_D @ params["w_GDD"][e] + params["b_GD"][e]
    h = x_D @ params["w1_GDF"][e]
    h = F.gelu(h) if activation == "gelu" else F.silu(h) * (x_D @ params["w3_GDF"][e])
    return h @ params["w2_GFD"][e]


def _route_token(logits_E: torch.Tensor, cfg: MoEConfig, bias_E: torch.Tensor | None):
    """One token's choice, spelled out: (expert ids best first, their scores, combine weights)."""
    E, K = cfg.num_experts, cfg.top_k
    scores = torch.sigmoid(logits_E) if cfg.score == "sigmoid" else torch.softmax(logits_E, -1)
    select = [float(scores[e].detach()) + (float(bias_E[e]) if bias_E is not None else 0.0) for e in range(E)]
    eligible = list(range(E))
    if cfg.n_group > 1:
        size = E // cfg.n_group
        group_score = [sum(sorted(select[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(cfg.n_group)]
        best = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
        eligible = [e for e in range(E) if e // size in best]
    ids = sorted(eligible, key=lambda e: -select[e])[:K]
    chosen = torch.stack([scores[e] for e in ids])
    renormalise = cfg.normalize_weights and not (K == 1 and not cfg.normalize_top1)
    weights = chosen / chosen.sum() if renormalise else chosen
    return ids, chosen, weights * cfg.routed_scaling_factor


def _balance(probs_TE: torch.Tensor, ids_TK: list[list[int]], E: int, K: int) -> torch.Tensor:
    f = torch.zeros(E, dtype=probs_TE.dtype)
    for row in ids_TK:
        for e in row:
            f[e] += 1.0 / (len(ids_TK) * K)
    return E * (f * probs_TE.mean(0)).sum()


def shared_ffn(x_D: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
    """The shared experts on one token (weights in nn.Linear layout [out, in])."""
    h = F.silu(shared["gate_proj"] @ x_D) * (shared["up_proj"] @ x_D)
    y = shared["down_proj"] @ h
    if "gate" in shared:
        y = torch.sigmoid(shared["gate"] @ x_D) * y
    return y


def reference_moe(
    x_TD: torch.Tensor,
    gate_ED: torch.Tensor,
    params: dict[str, torch.Tensor],
    cfg: MoEConfig,
    *,
    bias_E: torch.Tensor | None = None,
    seq_len: int | None = None,
    shared: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[tuple[int, int]]]:
    """Return (y_TD, unweighted aux losses, list of dropped (token, slot) pairs).

    `bias_E`: the selection-only correction bias; `seq_len`: tokens per sequence for the
    sequence-level loss; `shared`: the shared experts' weights (gate_proj, up_proj, down_proj, gate)."""
    T, E, K = x_TD.shape[0], cfg.num_experts, cfg.top_k
    dtype = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    if T == 0:
        zero = gate_ED.to(dtype).sum() * 0
        aux = {"load_balance": zero, "z_loss": zero}
        if cfg.seq_aux_weight > 0 and seq_len:
            aux["seq_load_balance"] = zero
        return x_TD * 0, aux, []
    logits = x_TD.to(dtype) @ gate_ED.to(dtype).t()
    routes = [_route_token(logits[t], cfg, bias_E) for t in range(T)]
    top_i = torch.tensor([r[0] for r in routes])
    top_p = torch.stack([r[1] for r in routes])
    weights = torch.stack([r[2] for r in routes])

    kept = {(t, k) for t in range(T) for k in range(K)}
    if cfg.capacity_factor is not None:
        cap = max(1, math.ceil(cfg.capacity_factor * T * K / E))
        for e in range(E):
            claims = [(t, k) for t in range(T) for k in range(K) if int(top_i[t, k]) == e]
            claims.sort(key=lambda tk: (-float(top_p[tk].detach()), tk[0] * K + tk[1]))
            for tk in claims[cap:]:
                kept.discard(tk)

    rows = []
    for t in range(T):
        acc = torch.zeros_like(x_TD[t])
        for k in range(K):
            if (t, k) in kept:
                e = int(top_i[t, k])
                acc = acc + weights[t, k].to(x_TD.dtype) * expert_ffn(x_TD[t], params, e, cfg.activation)
        if shared is not None:
            acc = acc + shared_ffn(x_TD[t], shared)
        rows.append(acc)
    y_TD = torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1])

    if cfg.score == "sigmoid":
        s = torch.sigmoid(logits)
        probs = s / s.sum(-1, keepdim=True)
    else:
        probs = torch.softmax(logits, -1)
    scale = K if cfg.aux_convention == "hf" else 1
    ids = top_i.tolist()
    aux = {
        "load_balance": scale * _balance(probs, ids, E, K),
        "z_loss": (torch.logsumexp(logits, -1) ** 2).mean(),
    }
    if cfg.seq_aux_weight > 0 and seq_len:
        per_seq = [_balance(probs[b : b + seq_len], ids[b : b + seq_len], E, K) for b in range(0, T, seq_len)]
        aux["seq_load_balance"] = scale * torch.stack(per_seq).mean()
    dropped = sorted({(t, k) for t in range(T) for k in range(K)} - kept)
    return y_TD, aux, dropped
