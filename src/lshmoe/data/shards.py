"""Training batches from a token store (data/store.py), read lazily through memory maps.

No rank holds the corpus: a batch reads its windows' pages of the memory-mapped token file, so a
GB-scale store opens in milliseconds and its pages are shared by the ranks of a node (page cache).

    text   random windows of seq_len+1 tokens anywhere in the split's token stream, the inputs and
           their next tokens (documents are separated by the eos id)
    SFT    windows that start at an example's first token (examples shorter than the window are
           followed by the next ones, packed); targets are the next tokens on reply tokens and -100
           elsewhere (prompts, the next example's first token, padding past the end), so the loss is
           on the replies only. Only examples whose first reply token lies inside the window are drawn.

Training windows come from a generator seeded by (seed, step, rank): each rank draws its own, and a
resumed run draws exactly the batches it would have drawn. Validation windows are fixed and evenly
spaced; together the ranks cover distinct windows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lshmoe.data.store import SPLITS, open_split, read_meta, store_key
from lshmoe.errors import DataError
from lshmoe.seeding import generator

IGNORE = -100
SPLIT_NAMES = {"train": "training", "val": "validation"}


class TokenData:
    """A token store opened for training: the batch API the training loops use."""

    def __init__(self, path: Path, *, vocab_size: int | None = None, source: str | None = None):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        tok = self.meta["tokenizer"]
        self.kind: str = self.meta["kind"]
        self.vocab_size: int = vocab_size if vocab_size is not None else int(tok["vocab_size"])
        self.tokenizer_path = self.path / "tokenizer.json"
        self.tokenizer_digest: str = tok["digest"]
        self.source: str = source or self.meta["source"]
        self.key: str = store_key(self.path)
        self.splits = {s: open_split(self.path, s, self.meta) for s in SPLITS}
        self.pad_id = tok["eos_id"] if tok["eos_id"] is not None else 0
        self._eligible: dict[tuple[str, int], np.ndarray] = {}

    def num_tokens(self, split: str) -> int:
        return int(self.meta["splits"][split]["tokens"])

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids (a read-only memory map)."""
        return self.splits[split]["tokens"]

    def describe(self) -> str:
        tr, va = self.meta["splits"]["train"], self.meta["splits"]["val"]
        unit = "examples" if self.kind == "sft" else "documents"
        return f"{tr['tokens']} training, {va['tokens']} validation tokens ({tr['documents']}+{va['documents']} {unit})"

    # ------------------------------------------------------------------------------------ checks

    def check_seq_len(self, seq_len: int) -> None:
        """One line unless both splits can fill a window of seq_len+1 tokens (SFT: hold an example
        whose first reply token lies inside the window)."""
        for split in SPLITS:
            st = self.meta["splits"][split]
            name = SPLIT_NAMES[split]
            if self.kind == "sft":
                if len(self.eligible(split, seq_len)) == 0:
                    raise DataError(
                        f"the {name} split has {st['documents']} SFT examples and none has a reply token within "
                        f"model.seq_len={seq_len} tokens of its start; give a larger seq_len or shorter prompts"
                    )
                continue
            if st["tokens"] < seq_len + 2:
                per_token = st["chars"] / max(1, st["tokens"])
                more = int((seq_len + 2 - st["tokens"]) * per_token) + 1
                raise DataError(
                    f"the {name} split has {st['tokens']} tokens ({st['documents']} documents, {st['chars']} "
                    f"characters), fewer than model.seq_len+2={seq_len + 2}; give more text (about {more} more "
                    f"characters in that split) or a smaller seq_len"
                )

    def eligible(self, split: str, seq_len: int) -> np.ndarray:
        """SFT: indices of the examples whose first reply token is a target of a window from their start."""
        key = (split, seq_len)
        if key not in self._eligible:
            first = np.asarray(self.splits[split]["first"])
            self._eligible[key] = np.flatnonzero((first >= 1) & (first <= seq_len))
        return self._eligible[key]

    def _drawable(self, split: str, seq_len: int) -> np.ndarray:
        elig = self.eligible(split, seq_len)
        if len(elig) == 0:
            self.check_seq_len(seq_len)  # NOTE: a batch asked for without the check gets its one-line error
        return elig

    # ------------------------------------------------------------------------------------ batches

    def train_batch(
        self, step: int, rank: int, batch: int, seq_len: int, seed: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows for (step, rank): inputs and targets, [batch, seq_len] int64."""
        g = generator(seed, "batch", step, rank)
        if self.kind == "sft":
            elig = self._drawable("train", seq_len)
            pick = torch.randint(0, len(elig), (batch,), generator=g).numpy()
            starts = self.splits["train"]["starts"][elig[pick]]
        else:
            starts = torch.randint(0, self.num_tokens("train") - seq_len - 1, (batch,), generator=g).numpy()
        return self._windows("train", starts, seq_len, device)

    def val_batch(
        self, index: int, rank: int, world: int, batch: int, seq_len: int, device: torch.device, num_batches: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed, evenly spaced validation windows; together the ranks cover distinct windows."""
        total = max(1, num_batches * world * batch)
        first = (index * world + rank) * batch
        if self.kind == "sft":
            elig = self._drawable("val", seq_len)
            pick = np.array([(i * len(elig)) // total for i in range(first, first + batch)], dtype=np.int64)
            starts = self.splits["val"]["starts"][elig[pick]]
        else:
            span = self.num_tokens("val") - seq_len - 1
            starts = np.array([(i * span) // total for i in range(first, first + batch)], dtype=np.int64)
        return self._windows("val", starts, seq_len, device)

    def _windows(
        self, split: str, starts: np.ndarray, seq_len: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        toks, n = self.splits[split]["tokens"], self.num_tokens(split)
        ids_BW = np.full((len(starts), seq_len + 1), self.pad_id, dtype=np.int64)
        loss_BW = np.zeros((len(starts), seq_len + 1), dtype=bool)
        mask = self.splits[split]["mask"]
        for b, s in enumerate(np.asarray(starts, dtype=np.int64)):
            e = min(n, s + seq_len + 1)
            ids_BW[b, : e - s] = toks[s:e]
            if mask is not None:
                loss_BW[b, : e - s] = mask[s:e] != 0
        ids = torch.from_numpy(ids_BW)
        x, y = ids[:, :-1], ids[:, 1:]
        if mask is not None:
            y = torch.where(torch.from_numpy(loss_BW[:, 1:]), y, torch.full_like(y, IGNORE))
        return x.contiguous().to(device), y.contiguous().to(device)


__all__ = ["IGNORE", "TokenData"]
