"""Token data for training: build once (corpus -> split -> tokenizer -> ids), cache, and batch.

The build runs on the first use of a corpus and is cached under `<cache_dir>/<key>/` (the key hashes
the source's file list, sizes and mtimes, the vocabulary size and the split). Concurrent ranks take
a file lock, so exactly one builds and the rest load.

Validation documents are chosen by a hash of their text, so the split does not depend on document
order. Training batches are random windows drawn from a generator seeded by (seed, step, rank): the
data position of a run is its step, and a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lshmoe.config import DataConfig
from lshmoe.errors import DataError
from lshmoe.seeding import generator
from lshmoe.train.corpus import check_unchanged, embedded_corpus, file_stats, fingerprint, user_corpus
from lshmoe.train.integrity import describe
from lshmoe.train.tokenizer import encode_docs, train_tokenizer

FORMAT = 1


@dataclass(kw_only=True)
class TokenData:
    train_ids: torch.Tensor  # int32 [n_train]
    val_ids: torch.Tensor  # int32 [n_val]
    vocab_size: int
    tokenizer_path: Path
    source: str
    key: str = "0"  # the cache key (hex): ranks compare it to be sure they read the same data

    def check_seq_len(self, seq_len: int) -> None:
        for name, ids in (("training", self.train_ids), ("validation", self.val_ids)):
            if ids.numel() < seq_len + 2:
                raise DataError(
                    f"the {name} split has {ids.numel()} tokens, fewer than model.seq_len+2="
                    f"{seq_len + 2}; give more text or a smaller seq_len"
                )

    def train_batch(
        self, step: int, rank: int, batch: int, seq_len: int, seed: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows for (step, rank): inputs and next-token targets, [batch, seq_len] int64."""
        g = generator(seed, "batch", step, rank)
        starts = torch.randint(0, self.train_ids.numel() - seq_len - 1, (batch,), generator=g)
        return self._windows(self.train_ids, starts, seq_len, device)

    def val_batch(
        self, index: int, rank: int, world: int, batch: int, seq_len: int, device: torch.device, num_batches: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed, evenly spaced validation windows; together the ranks cover distinct windows."""
        total = num_batches * world * batch
        span = self.val_ids.numel() - seq_len - 1
        first = (index * world + rank) * batch
        starts = torch.tensor([(i * span) // max(1, total) for i in range(first, first + batch)])
        return self._windows(self.val_ids, starts, seq_len, device)

    @staticmethod
    def _windows(
        ids: torch.Tensor, starts: torch.Tensor, seq_len: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        offs = starts[:, None] + torch.arange(seq_len + 1)[None, :]
        w = ids[offs].long()
        return w[:, :-1].to(device), w[:, 1:].to(device)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lshmoe"


def is_val(doc: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8", "replace"), digest_size=8).digest(), "little")
    return (h % 1_000_000) < fraction * 1_000_000


def _cache_key(cfg: DataConfig) -> str:
    src = fingerprint(cfg.corpus, cfg.path)
    raw = json.dumps(
        [FORMAT, src, cfg.path and str(Path(cfg.path).resolve()), cfg.corpus, cfg.vocab_size, cfg.val_fraction]
    )
    return hashlib.blake2b(raw.encode(), digest_size=10).hexdigest()


CACHED = ("ids.pt", "tokenizer.json")


def _build(cfg: DataConfig, out: Path, log: Callable[[str], None], stats: dict | None) -> None:
    """Build the cache; `stats` (a user corpus's files when its key was taken) must still hold at the end."""
    t0 = time.perf_counter()
    source = cfg.path or f"embedded:{cfg.corpus}"
    docs = user_corpus(cfg.path) if cfg.path else embedded_corpus(cfg.corpus)  # bad input fails before any output
    log(f"building token data from {source} (first use only; cached in {out})")
    train_docs = [d for d in docs if not is_val(d, cfg.val_fraction)]
    val_docs = [d for d in docs if is_val(d, cfg.val_fraction)]
    if not val_docs or not train_docs:
        # Too few documents for a hashed split: hold out the tail instead.
        cut = max(1, int(len(docs) * (1 - cfg.val_fraction)))
        train_docs, val_docs = docs[:cut], docs[cut:] or docs[-1:]
    tok = train_tokenizer(train_docs, cfg.vocab_size)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp / "tokenizer.json"))
    torch.save({"train": encode_docs(tok, train_docs), "val": encode_docs(tok, val_docs)}, tmp / "ids.pt")
    meta = {
        "source": source,
        "docs_train": len(train_docs),
        "docs_val": len(val_docs),
        "chars": sum(map(len, docs)),
        "vocab_size": tok.get_vocab_size(),
    }
    if stats is not None:
        check_unchanged(cfg.path, stats)
    meta["files"] = {name: describe(tmp / name) for name in CACHED}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out)
    log(
        f"built {meta['docs_train']}+{meta['docs_val']} documents, {meta['chars'] / 1e6:.1f} M chars, "
        f"vocab {meta['vocab_size']} in {time.perf_counter() - t0:.1f} s"
    )


def _damage(out: Path) -> str | None:
    """Why a cache entry cannot be used (None: intact). Entries record their files' sizes and digests;
    older ones without them are checked by parsing."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        files = meta.get("files")
    except (OSError, ValueError, AttributeError):
        return "meta.json unreadable"
    if not isinstance(files, dict):  # written before the cache recorded digests
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(out / "tokenizer.json"))
        except Exception:  # noqa: BLE001 - any parse failure: not a tokenizer file
            return "tokenizer.json is not a tokenizer file"
        return None
    for name in CACHED:
        want, p = files.get(name) or {}, out / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != want.get("bytes"):
            return f"{name} has {p.stat().st_size} bytes, {want.get('bytes')} expected (truncated or replaced)"
        if describe(p)["sha256"] != want.get("sha256"):
            return f"{name} does not match its recorded checksum (altered or replaced)"
    return None


def load_data(cfg: DataConfig, log: Callable[[str], None] = lambda s: None) -> TokenData:
    """Build (once, under a file lock) or load the cached token data for `cfg`. A damaged cache entry
    (truncated ids, a tokenizer file of another format) is rebuilt, saying so; a user corpus that
    changes while it is read is a one-line DataError."""
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    stats = file_stats(cfg.path) if cfg.path else None
    key = _cache_key(cfg)
    out = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            damage = _damage(out)
            if damage is None:
                try:
                    ids = torch.load(out / "ids.pt")
                except Exception as e:  # noqa: BLE001 - unpicklable content passed the size check
                    damage = f"ids.pt unreadable ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
            if damage is not None:
                log(f"token cache {out} is damaged ({damage}); rebuilding it")
                shutil.rmtree(out)
        if not out.exists():
            _build(cfg, out, log, stats)
            ids = torch.load(out / "ids.pt")
        meta = json.loads((out / "meta.json").read_text())
    return TokenData(
        train_ids=ids["train"],
        val_ids=ids["val"],
        vocab_size=meta["vocab_size"],
        tokenizer_path=out / "tokenizer.json",
        source=meta["source"],
        key=key,
    )
