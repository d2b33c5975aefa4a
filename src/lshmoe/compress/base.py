"""The compressor seam (DESIGN.md §1): between local permutation and the dispatch all-to-all.

A compressor turns the N routed rows (grouped by destination expert, `counts_E` rows per expert)
into M payload rows and per-expert payload counts; after the combine all-to-all it restores N output
rows from the M returned ones. Because it sits before the dispatch, every all-to-all of the layer
(forward dispatch and combine, and their backward exchanges) moves M rows instead of N.

`IdentityCompressor` sends every row (M = N) and is the default.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Compressor(Protocol):
    stats: dict[str, float]  # numbers of the last compress/restore, merged into the layer's metrics

    def compress(self, rows_ND: torch.Tensor, counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Return (payload_MD, payload counts per expert, meta for restore)."""
        ...

    def restore(self, out_MD: torch.Tensor, meta: Any) -> torch.Tensor:
        """Return the N output rows, in the order of the rows given to `compress`."""
        ...


class IdentityCompressor:
    """Send every routed row unchanged."""

    @property
    def stats(self) -> dict[str, float]:
        return {}

    def compress(self, rows_ND: torch.Tensor, counts_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return rows_ND, counts_E, None

    def restore(self, out_MD: torch.Tensor, meta: None) -> torch.Tensor:
        return out_MD


IDENTITY = IdentityCompressor()
