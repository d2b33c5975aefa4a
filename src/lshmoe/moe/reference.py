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


def reference_moe(
    x_TD: torch.Tensor, gate_ED: torch.Tensor, params: dict[str, torch.Tensor], cfg: MoEConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[tuple[int, int]]]:
    """Return (y_TD, unweighted aux losses, list of dropped (token, slot) pairs)."""
    T, E, K = x_TD.shape[0], cfg.num_experts, cfg.top_k
    dtype = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    if T == 0:
        zero = gate_ED.to(dtype).sum() * 0
        return x_TD * 0, {"load_balance": zero, "z_loss": zero}, []
    logits = x_TD.to(dtype) @ gate_ED.to(dtype).t()
    probs = torch.softmax(logits, -1)
    top_p, top_i = torch.topk(probs, K, -1)
    weights = top_p / top_p.sum(-1, keepdim=True) if (cfg.normalize_weights and K > 1) else top_p

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
        rows.append(acc)
    y_TD = torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[1])

    f = torch.zeros(E, dtype=dtype)
    for e in top_i.reshape(-1).tolist():
        f[e] += 1.0 / (T * K)
    aux = {
        "load_balance": E * (f * probs.mean(0)).sum(),
        "z_loss": (torch.logsumexp(logits, -1) ** 2).mean(),
    }
    dropped = sorted({(t, k) for t in range(T) for k in range(K)} - kept)
    return y_TD, aux, dropped
