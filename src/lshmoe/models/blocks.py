"""Reusable transformer blocks: norm, causal attention, dense MLP, and the pre-norm block that holds
either an MLP or an MoE layer.

Shapes: B batch, S sequence, D model width, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lshmoe.moe.layer import MoELayer, MoEOutput


def make_norm(kind: str, d_model: int) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model)
    return nn.LayerNorm(d_model)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        o_BHSd = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(o_BHSd.transpose(1, 2).reshape(B, S, D))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.fc = nn.Linear(d_model, d_hidden)
        self.proj = nn.Linear(d_hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + ffn(norm(x)) with an MLP or an MoE."""

    def __init__(
        self, d_model: int, n_heads: int, ffn: nn.Module, norm: str, dropout: float = 0.0, is_moe: bool | None = None
    ):
        super().__init__()
        self.is_moe = isinstance(ffn, MoELayer) if is_moe is None else is_moe
        self.norm1 = make_norm(norm, d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.norm2 = make_norm(norm, d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, MoEOutput | None]:
        x_BSD = x_BSD + self.drop(self.attn(self.norm1(x_BSD)))
        h = self.norm2(x_BSD)
        if self.is_moe:
            moe_out = self.ffn(h)
            return x_BSD + self.drop(moe_out.y_TD), moe_out
        return x_BSD + self.drop(self.ffn(h)), None
