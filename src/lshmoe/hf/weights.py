"""Whether a checkpoint directory's safetensors files are whole, checked from their headers alone.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON naming each tensor's
byte range, then the tensors, which cover the rest of the file exactly. A copy cut short (a full disk, an
interrupted download) fails inside safetensors with "incomplete metadata, file not fully covered" and no
file name; this check reads each header (a few KB) and names the file, before any rank loads a tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from lshmoe.hf.family import HFError

INDEX = "model.safetensors.index.json"


def weight_files(path: Path, required: bool = True) -> list[Path]:
    """The directory's safetensors files: those its index names, else every *.safetensors."""
    index = path / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFError(f"{index}: unreadable index ({str(e).splitlines()[0][:120]})") from None
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise HFError(f"{path}: shard {missing[0]} named in {INDEX} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files and required:
        raise HFError(f"{path}: no *.safetensors files (and no {INDEX})")
    return files


def problem(f: Path) -> str | None:
    """Why `f` is not a whole safetensors file (None: its size is what its header describes)."""
    size = f.stat().st_size
    if size < 8:
        return f"{size} bytes, less than a header"
    with open(f, "rb") as h:
        (n,) = struct.unpack("<Q", h.read(8))
        if n > size - 8:
            return f"{size} bytes, its header alone claims {8 + n}"
        try:
            header = json.loads(h.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "its header is unreadable"
    if size != 8 + n + end:
        return f"{size} bytes, its header describes {8 + n + end}"
    return None


def check_weight_files(path: Path, required: bool = True) -> None:
    """One line naming the first truncated or damaged safetensors file of checkpoint directory `path`."""
    for f in weight_files(path, required):
        why = problem(f)
        if why is not None:
            raise HFError(f"{f}: not a whole safetensors file ({why}): truncated or damaged; copy it again")


__all__ = ["check_weight_files", "problem", "weight_files"]
