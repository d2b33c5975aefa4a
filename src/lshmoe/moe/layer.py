"""The expert-parallel MoE layer: the six steps of DESIGN.md §1, one call each.

    x_TD ─► router ─► capacity ─► permute ─► compress ─► dispatch ─► experts ─► combine ─► restore ─► unpermute ─► y_TD

T local tokens, D model width, E global experts, K experts per token, N routed rows (T*K minus
drops), M payload rows actually sent (N for the identity compressor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lshmoe.compress.base import build_compressor
from lshmoe.config import MoEConfig
from lshmoe.dist.comm import Comm
from lshmoe.moe.capacity import capacity_keep_mask, expert_capacity
from lshmoe.moe.dispatch import build_dispatcher
from lshmoe.moe.experts import GroupedExperts
from lshmoe.moe.permute import permute_rows, sort_by_expert, unpermute_combine
from lshmoe.moe.router import TopKRouter


@dataclass(kw_only=True, slots=True)
class MoEOutput:
    y_TD: torch.Tensor
    aux: dict[str, torch.Tensor]  # unweighted router losses
    tokens_per_expert_E: torch.Tensor  # kept rows per global expert, from this rank (detached)
    dropped: torch.Tensor  # assignments dropped by the capacity limit on this rank (0-dim int64)
    rows_routed: int  # N
    rows_sent: int  # M


class MoELayer(nn.Module):
    """Top-k routed experts, sharded over the `ep` group of `comm`."""

    def __init__(self, cfg: MoEConfig, d_model: int, comm: Comm, layer_id: int):
        super().__init__()
        group = comm.group("ep")
        self.cfg, self.layer_id = cfg, layer_id
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        num_local = cfg.num_experts // group.size
        self.router = TopKRouter(d_model, cfg.num_experts, cfg.top_k, jitter=cfg.jitter,
                                 normalize_weights=cfg.normalize_weights)
        self.experts = GroupedExperts(num_local, d_model, cfg.d_expert, cfg.activation,
                                      first_expert=group.index * num_local)
        self.compressor = build_compressor(cfg.compress)
        self.dispatcher = build_dispatcher(comm, group, cfg.num_experts, tag=f"moe{layer_id}")

    def forward(self, x: torch.Tensor) -> MoEOutput:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T = x_TD.shape[0]

        route = self.router(x_TD)
        keep_TK = None
        if self.cfg.capacity_factor is not None:
            cap = expert_capacity(T, self.num_experts, self.top_k, self.cfg.capacity_factor)
            keep_TK = capacity_keep_mask(route.topk_ids_TK, route.topk_probs_TK, self.num_experts, cap)
        perm_N, counts_E = sort_by_expert(route.topk_ids_TK, self.num_experts, keep_TK)
        rows_ND = permute_rows(x_TD, perm_N, self.top_k)

        payload_MD, sent_counts_E, cmeta = self.compressor.compress(rows_ND, counts_E)
        dmeta = self.dispatcher.plan(sent_counts_E)
        local_rows = self.dispatcher.dispatch(payload_MD, dmeta)
        local_out = self.experts(local_rows, dmeta.local_counts)
        out_MD = self.dispatcher.combine(local_out, dmeta)
        out_ND = self.compressor.restore(out_MD, cmeta)

        y_TD = unpermute_combine(out_ND, perm_N, route.weights_TK, T)
        return MoEOutput(
            y_TD=y_TD.view(shape),
            aux=route.aux,
            tokens_per_expert_E=counts_E.detach(),
            dropped=torch.tensor(T * self.top_k - perm_N.numel()),
            rows_routed=rows_ND.shape[0],
            rows_sent=payload_MD.shape[0],
        )
