"""The token store: pre-tokenised data on disk, written once, memory-mapped by every rank.

    DIR/data.json          what it holds: kind (text | sft), source, tokenizer (digest, vocab size,
                           eos id, chat format), token dtype, per split: tokens, documents, characters,
                           largest id
    DIR/tokenizer.json     the tokenizer the ids come from
    DIR/<split>.tokens     the split's token ids, documents back to back (uint16, or uint32 when the
                           vocabulary needs it), raw little-endian: numpy.memmap reads it lazily
    DIR/<split>.starts     int64 [documents + 1]: where each document (SFT: example) starts
    DIR/<split>.mask       SFT only, uint8 [tokens]: 1 = a loss token (a reply token, data/chat.py)
    DIR/<split>.first      SFT only, int32 [examples]: offset of each example's first loss token (-1: none)
    DIR/manifest.json      every file's size and SHA-256 (lshmoe.integrity), written last

split is `train` or `val`. A directory with manifest.json and data.json of this format is a store;
`--data DIR` trains on it directly (`lshmoe data prepare` writes one; the token cache holds one per
corpus and tokenizer). Opening checks every file's size and the small files' digests; the token
files are re-hashed only on request (hashing a GB costs seconds on every start of every rank).
"""

from __future__ import annotations

import json
import os
import shutil
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from lshmoe import integrity
from lshmoe.errors import DataError

META = "data.json"
STORE_FORMAT = 1
SPLITS = ("train", "val")
HASH_ON_OPEN_BYTES = 64 << 20
FLUSH_TOKENS = 4 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_store(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file() and (path / integrity.MANIFEST).is_file()


class SplitWriter:
    """Appends documents (ids, and for SFT their loss masks) to one split's files."""

    def __init__(self, out: Path, name: str, dtype: np.dtype, sft: bool):
        self.out, self.name, self.dtype, self.sft = out, name, dtype, sft
        self.fh = {k: open(out / f"{name}.{k}", "wb") for k in (("tokens", "mask") if sft else ("tokens",))}
        self.starts = array("q", [0])
        self.first = array("i")
        self.pending: list[np.ndarray] = []
        self.pending_mask: list[np.ndarray] = []
        self.n_pending = 0
        self.chars = 0
        self.max_id = -1

    def add(self, ids: np.ndarray | list[int], chars: int, mask: np.ndarray | None = None) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids):
            self.max_id = max(self.max_id, int(ids.max()))
        self.pending.append(ids)
        self.starts.append(self.starts[-1] + len(ids))
        self.chars += chars
        if self.sft:
            hits = np.flatnonzero(mask)
            self.first.append(int(hits[0]) if len(hits) else -1)
            self.pending_mask.append(mask.astype(np.uint8))
        self.n_pending += len(ids)
        if self.n_pending >= FLUSH_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            np.concatenate(self.pending).astype(self.dtype).tofile(self.fh["tokens"])
        if self.pending_mask:
            np.concatenate(self.pending_mask).tofile(self.fh["mask"])
        self.pending, self.pending_mask, self.n_pending = [], [], 0

    def close(self) -> dict[str, int]:
        self._flush()
        for fh in self.fh.values():
            fh.close()
        np.asarray(self.starts, dtype=np.int64).tofile(self.out / f"{self.name}.starts")
        if self.sft:
            np.asarray(self.first, dtype=np.int32).tofile(self.out / f"{self.name}.first")
        return {
            "tokens": int(self.starts[-1]),
            "documents": len(self.starts) - 1,
            "chars": self.chars,
            "max_id": self.max_id,
        }


def finish(tmp: Path, out: Path, meta: dict[str, Any], json_text: str) -> None:
    """Write data.json, tokenizer.json and the manifest (last) into `tmp`, then rename it to `out`."""
    (tmp / "tokenizer.json").write_text(json_text, encoding="utf-8")
    (tmp / META).write_text(json.dumps({"format": STORE_FORMAT, **meta}, indent=1))
    integrity.write_manifest(tmp, {})
    integrity.fsync_dir(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def damage(path: Path, full: bool = False) -> str | None:
    """Why the store at `path` cannot be used (None: intact): a missing or unreadable manifest or
    data.json, a file missing or of another size, a small file (or with `full` any file) whose
    SHA-256 differs from the manifest's."""
    files = integrity.read_manifest(path)
    if isinstance(files, str):
        return files
    try:
        meta = json.loads((path / META).read_text())
        fmt = meta["format"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{META} is unreadable"
    if fmt != STORE_FORMAT:
        return f"{META} has format {fmt}, this lshmoe reads format {STORE_FORMAT}"
    for name in sorted(files):
        want, p = files[name], path / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, {want['bytes']} expected (truncated or replaced)"
        if (full or size <= HASH_ON_OPEN_BYTES) and integrity.sha256(p) != want["sha256"]:
            return f"{name} does not match its recorded checksum (altered or replaced)"
    return None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META).read_text())


def store_key(path: Path) -> str:
    """The identity of a store's content (hex): the digest of its manifest, equal for equal content."""
    import hashlib

    return hashlib.blake2b((path / integrity.MANIFEST).read_bytes(), digest_size=10).hexdigest()


def open_split(path: Path, name: str, meta: dict[str, Any]) -> dict[str, np.ndarray | None]:
    """The split's arrays as read-only memory maps (nothing is read until indexed)."""
    n = meta["splits"][name]["tokens"]
    dtype = np.dtype(meta["dtype"])

    def mm(suffix: str, dt: np.dtype, count: int) -> np.ndarray:
        if count == 0:
            return np.zeros(0, dtype=dt)
        return np.memmap(path / f"{name}.{suffix}", dtype=dt, mode="r", shape=(count,))

    docs = meta["splits"][name]["documents"]
    sft = meta["kind"] == "sft"
    return {
        "tokens": mm("tokens", dtype, n),
        "starts": mm("starts", np.dtype(np.int64), docs + 1),
        "mask": mm("mask", np.dtype(np.uint8), n) if sft else None,
        "first": mm("first", np.dtype(np.int32), docs) if sft else None,
        "documents": docs,
    }


def check_not_a_store_dir(out: Path, overwrite: bool) -> None:
    """`--out` may be a new path, an empty directory, or (with overwrite) an existing store."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out}: is a file; give a directory")
    if any(out.iterdir()) and not (overwrite and is_store(out)):
        what = "holds token shards" if is_store(out) else "is not empty"
        raise DataError(f"--out {out}: {what}; give a new directory{' or --overwrite' if is_store(out) else ''}")


def fail(shown: str, path: Path, why: str) -> DataError:
    return DataError(f"--data {shown}: the token shards in {path} are damaged: {why}; run lshmoe data prepare again")


__all__ = [
    "META",
    "SPLITS",
    "SplitWriter",
    "check_not_a_store_dir",
    "damage",
    "fail",
    "finish",
    "is_store",
    "open_split",
    "read_meta",
    "store_key",
    "token_dtype",
]
