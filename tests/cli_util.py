"""Run `lshmoe` as a real subprocess (its own ranks, its own console) on a tiny model and corpus."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

TINY = [
    "--d-model",
    "32",
    "--n-layers",
    "2",
    "--n-heads",
    "2",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--d-expert",
    "32",
    "--eval-every",
    "0",
    "--eval-batches",
    "2",
    "--progress",
    "false",
    "--vocab-size",
    "300",
]


def corpus(tmp: Path) -> Path:
    """A small real-English corpus: the docstrings of a few stdlib modules."""
    import inspect
    import json as j
    import textwrap

    path = tmp / "corpus.txt"
    if not path.exists():
        docs = [
            inspect.getdoc(obj) or "" for mod in (textwrap, j, inspect) for obj in vars(mod).values() if callable(obj)
        ]
        path.write_text("\n\n".join(d for d in docs if len(d) > 40))
    return path


def train_args(tmp: Path, out: Path | None, *extra: str, steps: int = 8) -> list[str]:
    """`lshmoe train` on TINY with 4 experts over `corpus(tmp)`, a metrics line per step, into `out` (None:
    no --out-dir, the job's own new directory under runs/)."""
    data = ["--data", str(corpus(tmp)), "--cache-dir", str(tmp / "cache")]
    return [
        "train",
        *TINY,
        *data,
        "--num-experts",
        "4",
        "--log-every",
        "1",
        "--steps",
        str(steps),
        *(["--out-dir", str(out)] if out is not None else []),
        *extra,
    ]


def run(args: list[str], timeout: float = 240, cwd: Path | None = None) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "lshmoe", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
    return proc.returncode, proc.stderr, time.monotonic() - t0


def losses(out_dir: Path) -> dict[int, float]:
    """Per-step training loss, the last record of each step winning (a resumed run appends)."""
    out = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            out[rec["step"]] = rec["loss"]
    return out


def real_docs(min_chars: int = 200) -> list[str]:
    """Real English documents in milliseconds: the docstrings (>= min_chars) of a few stdlib modules
    (the embedded corpus itself takes seconds to parse)."""
    import importlib
    import inspect

    mods = ["textwrap", "json", "inspect", "argparse", "collections", "pathlib", "subprocess", "functools"]
    mods += ["logging", "decimal", "fractions", "statistics", "random", "shutil", "tarfile", "zipfile"]
    mods += ["csv", "configparser", "difflib", "email.message", "http.client", "unittest.case"]
    docs: list[str] = []
    for m in mods:
        for obj in vars(importlib.import_module(m)).values():
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc) >= min_chars and doc not in docs:
                docs.append(doc)
    return docs
