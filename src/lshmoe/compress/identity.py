"""The identity compressor: every routed row travels unchanged (M = N). The default."""

from __future__ import annotations

import torch

from lshmoe.compress.protocol import CompressorBase, Positions, Stat


class IdentityCompressor(CompressorBase):
    name = "identity"
    rows_are_tokens = True

    @property
    def stats(self) -> dict[str, Stat]:
        return {}

    def compress(
        self, rows_ND: torch.Tensor, counts_E: torch.Tensor, positions: Positions | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        return rows_ND, counts_E, None

    def restore(self, out_MD: torch.Tensor, meta: None) -> torch.Tensor:
        return out_MD


IDENTITY = IdentityCompressor()


def build(ctx) -> IdentityCompressor:
    return IDENTITY
