"""Masked-LM batches, BERT's recipe, from the token windows of data/shards.py.

    each non-special position is picked with probability p (15%): its label is the token, else -100
    of the picked positions: 80% become [MASK], 10% a uniformly random token, 10% stay as they are

so the loss (hf/loss.py's lm_loss: cross-entropy over the labelled positions) asks the model to
predict the picked tokens. Training masks are drawn from a (seed, step, rank) generator and
validation masks from an (index, rank) one, so a resumed run sees the same batches and every
evaluation scores the same masked positions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lshmoe.data import TokenData
from lshmoe.hf.family import HFError
from lshmoe.seeding import generator


@dataclass(frozen=True, kw_only=True, slots=True)
class MaskSpec:
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]  # never picked ([CLS], [SEP], [PAD], ...)
    prob: float = 0.15


def mask_tokens(ids_BS: torch.Tensor, spec: MaskSpec, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_BS, labels_BS) for `ids_BS` (CPU draws from `gen`). At least one position is picked,
    so the loss of a batch is always defined."""
    ids_BS = ids_BS.cpu()
    u_BS = torch.rand(ids_BS.shape, generator=gen)
    kind_BS = torch.rand(ids_BS.shape, generator=gen)
    random_BS = torch.randint(0, spec.vocab_size, ids_BS.shape, generator=gen)
    eligible_BS = ~torch.isin(ids_BS, torch.tensor(spec.special_ids, dtype=ids_BS.dtype))
    picked_BS = eligible_BS & (u_BS < spec.prob)
    if not picked_BS.any():  # NOTE: a tiny batch can draw no position; take its lowest draw instead
        flat = torch.where(eligible_BS, u_BS, torch.inf).argmin()
        picked_BS.view(-1)[flat] = True
    labels_BS = torch.where(picked_BS, ids_BS, torch.full_like(ids_BS, -100))
    inputs_BS = torch.where(picked_BS & (kind_BS < 0.8), torch.full_like(ids_BS, spec.mask_id), ids_BS)
    inputs_BS = torch.where(picked_BS & (kind_BS >= 0.8) & (kind_BS < 0.9), random_BS, inputs_BS)
    return inputs_BS, labels_BS


def mask_spec(path: Path, vocab_size: int, prob: float) -> MaskSpec:
    """The mask token and special tokens of the checkpoint's tokenizer.json."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    conf = path / "tokenizer_config.json"
    name = json.loads(conf.read_text()).get("mask_token", "[MASK]") if conf.is_file() else "[MASK]"
    name = name.get("content", "[MASK]") if isinstance(name, dict) else name
    mask_id = tok.token_to_id(name)
    if mask_id is None:
        raise HFError(f"{path}/tokenizer.json: no mask token {name!r}; masked-LM training needs one")
    special = tuple(sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special and i != mask_id))
    return MaskSpec(mask_id=mask_id, vocab_size=vocab_size, special_ids=special, prob=prob)


class MaskedData:
    """TokenData's windows as masked-LM (inputs, labels); the same interface, so the HF trainer and
    validation loop take either."""

    def __init__(self, data: TokenData, spec: MaskSpec):
        self.data, self.spec = data, spec
        self.vocab_size, self.source, self.key = data.vocab_size, data.source, data.key

    def check_seq_len(self, seq_len: int) -> None:
        self.data.check_seq_len(seq_len)

    def train_batch(
        self, step: int, rank: int, batch: int, seq_len: int, seed: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = self.data.train_batch(step, rank, batch, seq_len, seed, torch.device("cpu"))
        inputs, labels = mask_tokens(x, self.spec, generator(seed, "mlm", step, rank))
        return inputs.to(device), labels.to(device)

    def val_batch(
        self, index: int, rank: int, world: int, batch: int, seq_len: int, device: torch.device, num_batches: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = self.data.val_batch(index, rank, world, batch, seq_len, torch.device("cpu"), num_batches)
        inputs, labels = mask_tokens(x, self.spec, generator("mlm-val", index, rank))
        return inputs.to(device), labels.to(device)


__all__ = ["MaskSpec", "MaskedData", "mask_spec", "mask_tokens"]
