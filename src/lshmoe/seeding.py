"""Deterministic seeds derived from named integers.

Every random draw that must be reproducible across ranks, world sizes and resumed runs (expert
weights, data order, LSH projections) takes a generator seeded from a tuple such as
(seed, layer, expert) or (seed, step, layer). The same tuple gives the same stream everywhere.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (order matters)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded from `parts` (draw on CPU, then move: identical on every device)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(*parts))
    return g
