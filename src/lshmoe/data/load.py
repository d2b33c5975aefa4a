"""The run's token data: a prepared store, or one built once into the token cache, then memory-mapped.

    --data DIR of token shards   (`lshmoe data prepare`) opened as it is; its tokenizer must be the
                                 model's (HF: same tokenizer digest, every id below vocab_size)
    anything else                built on first use into `<cache_dir>/<key>/` (the key hashes the
                                 source's file list, sizes and mtimes, the tokenizer and the split
                                 and format settings); concurrent ranks take a file lock, so exactly
                                 one builds and the rest open what it wrote

`load_data` is the GPT-MoE's (lshmoe's own BPE of data.vocab_size, trained on the training split);
`hf_token_data` is `train --hf`'s (the checkpoint's tokenizer.json, and its chat template for SFT).
Both return a `TokenData` (data/shards.py). A damaged cache entry (a truncated token file, a replaced
tokenizer) is rebuilt, saying so; a source file that changes while it is read is one line.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from lshmoe.config import Config, DataConfig
from lshmoe.data import store as S
from lshmoe.data.build import build_store
from lshmoe.data.files import check_unchanged, file_stats
from lshmoe.data.shards import TokenData
from lshmoe.data.source import Source, open_source
from lshmoe.data.tokenizer import TextTokenizer, load_tokenizer
from lshmoe.errors import DataError

CACHE_FORMAT = 2  # 1: ids.pt + tokenizer.json (before token stores)
Log = Callable[[str], None]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lshmoe"


def cache_root(dc: DataConfig) -> Path:
    return Path(dc.cache_dir).expanduser() if dc.cache_dir else default_cache_dir()


def prepared_dir(dc: DataConfig) -> Path | None:
    """The --data directory when it holds token shards (a store), else None."""
    if dc.path is None:
        return None
    path = Path(dc.path).expanduser()
    return path if S.is_store(path) else None


def open_prepared(path: Path, shown: str, log: Log, vocab_size: int | None = None) -> TokenData:
    why = S.damage(path)
    if why is not None:
        raise S.fail(shown, path, why)
    data = TokenData(path, vocab_size=vocab_size, source=shown)
    log(f"token shards {path} ({data.meta['what']}, {data.kind}): {data.describe()}")
    return data


def _key(parts: list) -> str:
    return hashlib.blake2b(json.dumps([CACHE_FORMAT, *parts], default=str).encode(), digest_size=10).hexdigest()


def _source_parts(src: Source, dc: DataConfig) -> list:
    return [src.fingerprint, src.path and str(src.path.resolve()), dc.corpus, dc.val_fraction, dc.field, dc.format]


def cached(root: Path, key: str, build: Callable[[Path], None], log: Log) -> Path:
    """The cache entry `root/key`, built by `build(path)` unless an intact one exists (under a lock)."""
    root.mkdir(parents=True, exist_ok=True)
    out = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            why = S.damage(out) if S.is_store(out) else "it is incomplete"
            if why is not None:
                log(f"token cache {out} is damaged ({why}); rebuilding it")
                shutil.rmtree(out)
        if not out.exists():
            build(out)
    return out


def _build_into(src: Source, tok: TextTokenizer | None, dc: DataConfig, root: Path, log: Log) -> Callable[[Path], None]:
    stats = file_stats(src.files) if src.files else None

    def build(out: Path) -> None:
        # NOTE: bad input fails before any output: the records are read and split first
        records = src.load(root, log)
        check = (lambda: check_unchanged(src.shown, src.files, stats)) if stats is not None else None
        build_store(
            records,
            tok,
            dc.vocab_size,
            out,
            fraction=dc.val_fraction,
            shown=src.shown,
            log=log,
            before_finish=check,
            started=lambda: log(f"building token data from {src.shown} (first use only; cached in {out})"),
        )

    return build


def load_data(dc: DataConfig, log: Log = lambda s: None) -> TokenData:
    """The GPT-MoE's token data: a prepared store as it is, else built once (lshmoe's BPE) and cached."""
    prepared = prepared_dir(dc)
    if prepared is not None:
        return open_prepared(prepared, dc.path, log)
    src = open_source(dc, log)
    root = cache_root(dc)
    key = _key(["bpe", dc.vocab_size, *_source_parts(src, dc)])
    out = cached(root, key, _build_into(src, None, dc, root, log), log)
    return TokenData(out, source=src.shown)


def hf_token_data(tokenizer_dir: Path, cfg: Config, vocab_size: int, log: Log = lambda s: None) -> TokenData:
    """`train --hf`'s token data: the run's text (or SFT examples) tokenised once by the checkpoint's
    tokenizer.json (and chat template), cached, memory-mapped; or prepared shards, which must come
    from the same tokenizer. Every id must be below the model's `vocab_size`."""
    dc = cfg.data
    tok_file = Path(tokenizer_dir) / "tokenizer.json"
    if not tok_file.is_file():
        raise DataError(
            f"{tokenizer_dir}: no tokenizer.json; train --hf tokenises --data with the checkpoint's own tokenizer"
        )
    tok = load_tokenizer(Path(tokenizer_dir), "--hf")
    prepared = prepared_dir(dc)
    if prepared is not None:
        data = open_prepared(prepared, dc.path, log, vocab_size=vocab_size)
        if data.tokenizer_digest != tok.digest:
            raise DataError(
                f"--data {dc.path}: its token shards were prepared with another tokenizer "
                f"({data.meta['tokenizer']['origin']}, vocab {data.meta['tokenizer']['vocab_size']}) than the "
                f"model's {tok_file} (vocab {tok.vocab_size}); prepare them again with --hf {tokenizer_dir}"
            )
    else:
        src = open_source(dc, log)
        root = cache_root(dc)
        key = _key(["hf", tok.digest, tok.eos_id, _chat_identity(tok), *_source_parts(src, dc)])
        out = cached(root, key, _build_into(src, tok, dc, root, log), log)
        data = TokenData(out, vocab_size=vocab_size, source=src.shown)
        log(f"token data for {src.shown} with {tok_file}: {data.describe()}")
    check_vocab(data, vocab_size, f"--data {dc.path or data.source}")
    return data


def _chat_identity(tok: TextTokenizer) -> str:
    """What of the tokenizer directory decides SFT rendering: the template files' content."""
    if tok.config_dir is None:
        return ""
    h = hashlib.blake2b(digest_size=8)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        p = tok.config_dir / name
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def check_vocab(data: TokenData, vocab_size: int, shown: str) -> None:
    top = max(int(data.meta["splits"][s]["max_id"]) for s in S.SPLITS)
    if top >= vocab_size:
        raise DataError(
            f"{shown}: token id {top} is outside the model's vocab_size={vocab_size} "
            f"(tokenizer vocab {data.meta['tokenizer']['vocab_size']}); use the model's own tokenizer"
        )


__all__ = ["cache_root", "check_vocab", "default_cache_dir", "hf_token_data", "load_data", "open_prepared"]
