"""Tokenizers: lshmoe's own byte-level BPE (trained offline) and a given `tokenizer.json`.

Byte-level BPE never meets an unknown character, so any UTF-8 text encodes. A document is encoded
with the tokenizer's own special tokens (its post-processor: [CLS] .. [SEP] for BERT, nothing for
the BPE) and followed by the end-of-text id when the tokenizer has one, so the model sees document
boundaries. A given tokenizer (`--tokenizer PATH`, or an HF checkpoint's directory) also brings its
`tokenizer_config.json`: the eos token and, for SFT, the chat template (data/chat.py).

`digest` identifies a tokenizer by content (its JSON re-serialised with sorted keys, so a re-save
with other whitespace is the same tokenizer): token shards record it, and a model whose tokenizer
has another digest is refused (data/load.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lshmoe.errors import DataError

EOS = "<|endoftext|>"


def train_tokenizer(docs: Iterable[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer)
    return tok


def json_digest(text: str) -> str:
    return hashlib.sha256(json.dumps(json.loads(text), sort_keys=True).encode()).hexdigest()


@dataclass
class TextTokenizer:
    """A `tokenizers.Tokenizer` with what lshmoe needs around it."""

    tok: Tokenizer
    json_text: str  # the tokenizer.json content (copied into token shards)
    eos_id: int | None
    config_dir: Path | None  # the directory with tokenizer_config.json (chat template), if any
    origin: str  # where it came from, for messages

    @property
    def digest(self) -> str:
        return json_digest(self.json_text)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def eos_text(self) -> str | None:
        return None if self.eos_id is None else self.tok.id_to_token(self.eos_id)

    def encode_docs(self, docs: list[str]) -> list[list[int]]:
        """Every document's ids (with the tokenizer's special tokens), each followed by eos if any."""
        tail = [] if self.eos_id is None else [self.eos_id]
        return [enc.ids + tail for enc in self.tok.encode_batch(docs)]


def _plain(tok: Tokenizer) -> Tokenizer:
    tok.no_padding()  # NOTE: a sentence-embedding tokenizer pads / truncates every text to 128 tokens
    tok.no_truncation()
    return tok


def from_bpe(tok: Tokenizer) -> TextTokenizer:
    """lshmoe's own BPE (train_tokenizer), eos = <|endoftext|>."""
    return TextTokenizer(tok=tok, json_text=tok.to_str(), eos_id=tok.token_to_id(EOS), config_dir=None, origin="bpe")


def _eos_name(conf: Path) -> str | None:
    if not conf.is_file():
        return None
    try:
        name = json.loads(conf.read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        raise DataError(f"{conf}: not a readable tokenizer_config.json") from None
    return name.get("content") if isinstance(name, dict) else name


def load_tokenizer(path: Path, what: str = "--tokenizer") -> TextTokenizer:
    """A tokenizer.json file, or a directory holding one (with its tokenizer_config.json: the eos
    token and chat template). Without a configured eos, <|endoftext|> is used when the vocabulary has it."""
    path = Path(path).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{what} {path}: no tokenizer.json there; give a tokenizer.json or a directory with one")
    text = file.read_text(encoding="utf-8", errors="replace")
    try:
        tok = _plain(Tokenizer.from_str(text))
    except Exception:  # noqa: BLE001 - any parse failure: not a tokenizers file
        raise DataError(f"{what} {file}: not a tokenizer.json of the tokenizers library") from None
    name = _eos_name(file.parent / "tokenizer_config.json")
    eos = tok.token_to_id(name) if name else tok.token_to_id(EOS)
    conf_dir = file.parent if (file.parent / "tokenizer_config.json").is_file() else None
    return TextTokenizer(tok=tok, json_text=text, eos_id=eos, config_dir=conf_dir, origin=str(file))


__all__ = ["EOS", "TextTokenizer", "from_bpe", "json_digest", "load_tokenizer", "train_tokenizer"]
