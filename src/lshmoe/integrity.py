"""File integrity: a manifest of every file's size and SHA-256, written last, checked before use.

Checkpoints (train/checkpoint.py) and token stores (data/store.py) both use it. A save is complete
when `manifest.json` exists: it is the last file written into the directory (for a checkpoint after
the shards, DCP's `.metadata` and `meta.json`) and is itself written to a temporary name,
flushed to disk and renamed. Verification re-hashes the files the manifest lists; a missing file,
a different size (a truncated copy) or a different digest (a flipped bit) is reported in one line
that names the file. Verification can be split over ranks: rank r checks every W-th file and the
ranks agree on the first problem (`first_problem` codes travel through one all-reduce).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
CHUNK = 4 << 20
# Problem kinds; a problem travels between ranks as `index * len(KINDS) + kind` (smaller = first).
KINDS = ("is missing", "is truncated", "fails its checksum")
NO_PROBLEM = 1 << 62


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def describe(path: Path) -> dict[str, object]:
    """The manifest entry of one file."""
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_durably(path: Path, obj: object) -> None:
    """Write `path` through a temporary name, flushed to disk, then renamed (never a torn file)."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifest(ckpt_dir: Path, files: dict[str, dict[str, object]], step: int | None = None) -> None:
    """Record `files` (relative name -> entry); every other file under `ckpt_dir`, subdirectories
    included, is hashed here. `step`: a checkpoint's training step (None for other directories: not
    recorded)."""
    entries = dict(files)
    for p in sorted(ckpt_dir.rglob("*")):
        name = p.relative_to(ckpt_dir).as_posix()  # side files live in subdirectories (`hf/config.json`)
        if p.is_file() and name not in entries and name != MANIFEST and not name.endswith(".part"):
            fsync_file(p)
            entries[name] = describe(p)
    head = {"format": MANIFEST_FORMAT} if step is None else {"format": MANIFEST_FORMAT, "step": step}
    write_json_durably(ckpt_dir / MANIFEST, {**head, "files": entries})


def read_manifest(ckpt_dir: Path) -> dict[str, dict] | str:
    """The manifest's file entries, or a one-phrase reason why there is none usable."""
    path = ckpt_dir / MANIFEST
    if not path.is_file():
        return f"it has no {MANIFEST} (the save did not finish, or an older lshmoe wrote it)"
    try:
        man = json.loads(path.read_text())
        files = man["files"]
        ok = isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            for v in files.values()
        )
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        return f"{MANIFEST} is unreadable"
    return files


def check_file(ckpt_dir: Path, name: str, entry: dict) -> int | None:
    """The problem kind of one file, or None when it matches its manifest entry."""
    p = ckpt_dir / name
    if not p.is_file():
        return 0
    if p.stat().st_size != entry["bytes"]:
        return 1
    return None if sha256(p) == entry["sha256"] else 2


def first_problem(ckpt_dir: Path, files: dict[str, dict], part: int = 0, parts: int = 1) -> int:
    """Code of the first bad file among those with index % parts == part (NO_PROBLEM if none)."""
    names = sorted(files)
    for i in range(part, len(names), parts):
        kind = check_file(ckpt_dir, names[i], files[names[i]])
        if kind is not None:
            return i * len(KINDS) + kind
    return NO_PROBLEM


def explain(ckpt_dir: Path, files: dict[str, dict], code: int) -> str:
    """One line for a problem code (sizes re-read here, so any rank can phrase it)."""
    name = sorted(files)[code // len(KINDS)]
    kind = code % len(KINDS)
    detail = ""
    if kind == 1:
        p = ckpt_dir / name
        size = p.stat().st_size if p.is_file() else 0
        detail = f" ({size} of {files[name]['bytes']} bytes)"
    elif kind == 2:
        detail = " (its content changed after the save)"
    return f"checkpoint {ckpt_dir} is corrupted: {name} {KINDS[kind]}{detail}"


def verify(ckpt_dir: Path) -> str | None:
    """Check every file of a checkpoint in this process; None when intact, else one line."""
    files = read_manifest(ckpt_dir)
    if isinstance(files, str):
        return f"checkpoint {ckpt_dir} is incomplete: {files}"
    code = first_problem(ckpt_dir, files)
    return None if code == NO_PROBLEM else explain(ckpt_dir, files, code)
