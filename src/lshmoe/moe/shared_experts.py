"""Shared experts inside the MoE layer: dense SwiGLU experts every token visits (DeepSeek, Qwen-MoE).

Shapes: T tokens, D model width, F hidden width of all shared experts together (n experts of width
F/n side by side are one SwiGLU of width F: the sum of their outputs equals it exactly).

    y_TD = (silu(x_TD @ W_gate_FD^T) * (x_TD @ W_up_FD^T)) @ W_down_DF^T
    gated (Qwen2-MoE): y_TD = sigmoid(x_TD @ w_1D^T) * y_TD

The layer starts its dispatch all-to-all before running these and waits for it after, so the shared
experts compute while the routed tokens travel (moe/layer.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SharedExperts(nn.Module):
    def __init__(self, d_model: int, d_hidden: int, num: int = 1, gated: bool = False):
        super().__init__()
        width = d_hidden * num
        self.gate_proj = nn.Linear(d_model, width, bias=False)
        self.up_proj = nn.Linear(d_model, width, bias=False)
        self.down_proj = nn.Linear(width, d_model, bias=False)
        self.gate = nn.Linear(d_model, 1, bias=False) if gated else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = self.down_proj(F.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))
        if self.gate is not None:
            y_TD = torch.sigmoid(self.gate(x_TD)) * y_TD
        return y_TD
