"""The held-out validation split, by document (or SFT example), never the training data.

A document is held out when a hash of its text falls below `val_fraction`, so the split does not
depend on the order of the documents and a document repeated in the corpus is on one side only.
Data with its own validation split (a saved DatasetDict) keeps it. When the hash leaves one side
empty (a few documents), the last `val_fraction` of the documents (at least one) is held
out instead. Fewer than two documents cannot be split: one line says how much text there is and
how much is needed.
"""

from __future__ import annotations

import hashlib

from lshmoe.errors import DataError

MIN_DOCUMENTS = 2


def is_val(text: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "little")
    return (h % 1_000_000) < fraction * 1_000_000


def assign(flags: bytearray, forced: bool, fraction: float, shown: str, chars: int, unit: str) -> bytearray:
    """Final per-document flags (1 = validation). `flags` holds the hash (or the data's own) split;
    `forced`: the data brought its own split, which is kept as it is."""
    n = len(flags)
    if n < MIN_DOCUMENTS:
        raise DataError(
            f"--data {shown}: {n} {unit}{'s' if n != 1 else ''} ({chars} characters) is too little for a held-out "
            f"validation split; give at least {MIN_DOCUMENTS} {unit}s (text: two paragraphs or lines) and enough "
            "text for model.seq_len+2 tokens on each side"
        )
    n_val = sum(flags)
    if forced:
        if n_val == n:
            raise DataError(f"--data {shown}: its training split is empty ({n} {unit}s, all validation)")
        return flags
    if 0 < n_val < n:
        return flags
    cut = max(1, int(n * (1 - fraction)))  # NOTE: < n for any fraction > 0, so both sides are non-empty
    return bytearray([0] * cut + [1] * (n - cut))


__all__ = ["MIN_DOCUMENTS", "assign", "is_val"]
