"""The local experts of one MoE layer, as batched weights and a grouped matmul.

Shapes: N rows (expert-major), D model width, F expert hidden width, G local experts.

    gelu:    y = gelu(x @ w1_GDF[g]) @ w2_GFD[g]
    swiglu:  y = (silu(x @ w1_GDF[g]) * (x @ w3_GDF[g])) @ w2_GFD[g]
    linear:  y = x @ w_GDD[g] + b_GD[g]          (analysis expert: LSH error is exactly (W - I)(x - c))
    identity: y = x                               (analysis expert: LSH compensation is exact)

With `bias` the gelu and swiglu experts add a per-expert bias after each projection (b1_GF, b3_GF,
b2_GD), as a BERT FFN does: an expert upcycled from a dense FFN (hf/upcycle.py) then computes that
FFN exactly. The biases start at zero and draw nothing, so the weights equal those of a biasless bank.

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
FFN_BIASES = ("b1_GF", "b2_GD", "b3_GF")


def _affine(x_NX: torch.Tensor, w_GXY: torch.Tensor, b_GY: torch.Tensor | None, counts_G: list[int]) -> torch.Tensor:
    """x @ w[g] (+ b[g]) for the rows of each group g."""
    out_NY = grouped_mm(x_NX, w_GXY, counts_G)
    if b_GY is None:
        return out_NY
    b_NY = torch.repeat_interleave(b_GY, torch.tensor(counts_G, device=b_GY.device), dim=0)
    return out_NY + b_NY.to(out_NY.dtype)  # (under autocast the rows stay in the compute dtype)


class GroupedExperts(nn.Module):
    def __init__(
        self, num_local: int, d_model: int, d_hidden: int, activation: str, first_expert: int = 0, bias: bool = False
    ):
        super().__init__()
        assert activation in ACTIVATIONS, activation
        assert not bias or activation in ("gelu", "swiglu"), activation
        self.num_local, self.d_model, self.d_hidden = num_local, d_model, d_hidden
        self.activation, self.first_expert = activation, first_expert
        G, D, H = num_local, d_model, d_hidden
        if activation in ("gelu", "swiglu"):
            self.w1_GDF = nn.Parameter(torch.empty(G, D, H))
            self.w2_GFD = nn.Parameter(torch.empty(G, H, D))
        if activation == "swiglu":
            self.w3_GDF = nn.Parameter(torch.empty(G, D, H))
        for name, shape in (("b1_GF", (G, H)), ("b2_GD", (G, D)), ("b3_GF", (G, H))):
            wanted = bias and (name != "b3_GF" or activation == "swiglu")
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)) if wanted else None)
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
                if name in FFN_BIASES:
                    with torch.no_grad():
                        p[g].zero_()
                    continue
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
            return _affine(x_ND, self.w_GDD, self.b_GD, counts_G)
        h_NF = _affine(x_ND, self.w1_GDF, self.b1_GF, counts_G)
        if self.activation == "gelu":
            h_NF = F.gelu(h_NF)
        else:
            h_NF = F.silu(h_NF) * _affine(x_ND, self.w3_GDF, self.b3_GF, counts_G)
        return _affine(h_NF, self.w2_GFD, self.b2_GD, counts_G)
