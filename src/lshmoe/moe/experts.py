"""The local experts of one MoE layer, as batched weights and a grouped matmul.

Shapes: N rows (expert-major), D model width, F expert hidden width, G local experts.

    gelu:    y = gelu(x @ w1_GDF[g]) @ w2_GFD[g]
    swiglu:  y = (silu(x @ w1_GDF[g]) * (x @ w3_GDF[g])) @ w2_GFD[g]
    linear:  y = x @ w_GDD[g] + b_GD[g]          (analysis expert: LSH error is exactly (W - I)(x - c))
    identity: y = x                               (analysis expert: LSH compensation is exact)

Expert g of this rank is global expert `first_expert + g`. Its weights are drawn from a generator
seeded by (seed, layer, global expert id), so a model has the same experts at every
expert-parallel size: a 4-rank model equals a 1-rank model, and checkpoints reshard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lshmoe.moe.grouped_mm import grouped_mm
from lshmoe.moe.param_kinds import ParamKind, mark
from lshmoe.seeding import generator

ACTIVATIONS = ("gelu", "swiglu", "linear", "identity")


class GroupedExperts(nn.Module):
    def __init__(self, num_local: int, d_model: int, d_hidden: int, activation: str, first_expert: int = 0):
        super().__init__()
        assert activation in ACTIVATIONS, activation
        self.num_local, self.d_model, self.d_hidden = num_local, d_model, d_hidden
        self.activation, self.first_expert = activation, first_expert
        G, D, H = num_local, d_model, d_hidden
        if activation in ("gelu", "swiglu"):
            self.w1_GDF = nn.Parameter(torch.empty(G, D, H))
            self.w2_GFD = nn.Parameter(torch.empty(G, H, D))
        if activation == "swiglu":
            self.w3_GDF = nn.Parameter(torch.empty(G, D, H))
        if activation == "linear":
            self.w_GDD = nn.Parameter(torch.empty(G, D, D))
            self.b_GD = nn.Parameter(torch.empty(G, D))
        for p in self.parameters():
            mark(p, ParamKind.EXPERT)

    def reset_parameters(self, seed: int, layer_id: int, std_in: float, std_out: float) -> None:
        """Draw every local expert from its own (seed, layer, global expert) generator."""
        for g in range(self.num_local):
            gen = generator(seed, "expert", layer_id, self.first_expert + g)
            for name, p in self.named_parameters():
                std = std_out if name.startswith("w2") else std_in
                if name.startswith("b_"):
                    std = std_in
                draw = torch.randn(p.shape[1:], generator=gen, dtype=torch.float32) * std
                with torch.no_grad():
                    p[g].copy_(draw.to(p.dtype))

    def forward(self, x_ND: torch.Tensor, counts_G: list[int]) -> torch.Tensor:
        """Run rows through their experts; `counts_G[g]` consecutive rows belong to local expert g."""
        if self.activation == "identity":
            return x_ND
        if self.activation == "linear":
            b_ND = torch.repeat_interleave(self.b_GD, torch.tensor(counts_G, device=x_ND.device), dim=0)
            return grouped_mm(x_ND, self.w_GDD, counts_G) + b_ND
        h_NF = grouped_mm(x_ND, self.w1_GDF, counts_G)
        if self.activation == "gelu":
            h_NF = F.gelu(h_NF)
        else:
            h_NF = F.silu(h_NF) * grouped_mm(x_ND, self.w3_GDF, counts_G)
        return grouped_mm(h_NF, self.w2_GFD, counts_G)
