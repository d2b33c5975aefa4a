"""The identity compressor: every routed row travels unchanged (M = N). The default.

`moe.grad_path = b` (beyond the paper, an analysis and training option): the exact model given the
gradient-only identity path that LSH-MoE's residual opens, y_n = E(x_n) + b (x_n - stopgrad(x_n)) for
every routed row: the forward is exact (bit for bit), and each row's input gradient gains b g_n, its
own upstream gradient (times its gate weight, as the layer's combine weights the row). With
`lsh.grad_compensation = b` the compressed model gets the same term (its restore adds x - c in the
gradient only); this one asks whether the gain needs compression at all.
"""

from __future__ import annotations

import torch

from lshmoe.compress.ops import grad_path
from lshmoe.compress.protocol import CompressorBase, Positions, Stat


class IdentityCompressor(CompressorBase):
    name = "identity"
    rows_are_tokens = True

    def __init__(self, grad_path: float = 0.0):
        self.grad_path = grad_path

    @property
    def stats(self) -> dict[str, Stat]:
        return {}

    def compress(
        self, rows_ND: torch.Tensor, counts_E: torch.Tensor, positions: Positions | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return rows_ND, counts_E, rows_ND if self.grad_path else None

    def restore(self, out_MD: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        if meta is None or not torch.is_grad_enabled():
            return out_MD
        return grad_path(out_MD, meta, self.grad_path)


IDENTITY = IdentityCompressor()


def build(ctx) -> IdentityCompressor:
    b = ctx.config().moe.grad_path  # its rules (identity only, not with dedup) are the moe section's
    return IdentityCompressor(b) if b else IDENTITY
