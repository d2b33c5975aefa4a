"""Text corpora: the embedded docstring corpus, and user text files.

The embedded default needs no download: it is the docstrings of the Python standard library
(`stdlib`, ~1.6 MB of English prose and technical text, identical on every install of the same
Python version) or of the stdlib plus every installed package (`installed`, ~30 MB here, varies by
machine). Documents are docstrings, deduplicated, at least 40 characters long.

User text (`--data PATH`) is a UTF-8 file or a directory of them; each file is cut into documents
of about 4,000 characters at paragraph boundaries so that the validation split has many documents.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from lshmoe.errors import DataError

MIN_DOC_CHARS = 40
DOC_CHARS = 4000
# Test suites are mostly code, not prose; site-packages inside the stdlib tree is walked separately.
_SKIP_DIRS = {"test", "tests", "__pycache__", "site-packages", "dist-packages", "idlelib", "lib2to3"}


def _python_files(root: Path) -> Iterator[Path]:
    """Every .py file under `root`, in a fixed order, skipping test suites and nested site dirs."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOC_CHARS:
                out.append(doc)
    return out


def embedded_roots(kind: str) -> list[Path]:
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    if kind == "installed":
        for key in ("purelib", "platlib"):
            p = Path(sysconfig.get_paths()[key])
            if p not in roots and p.is_dir():
                roots.append(p)
    return roots


def embedded_corpus(kind: str) -> list[str]:
    """Deduplicated docstrings of the stdlib (`stdlib`) or of stdlib and site-packages (`installed`)."""
    seen: set[str] = set()
    docs = []
    for root in embedded_roots(kind):
        for path in _python_files(root):
            for doc in _docstrings(path):
                if doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return docs


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts))


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is binary (NUL bytes or not UTF-8)."""
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _chunk(text: str) -> list[str]:
    docs, cur = [], []
    size = 0
    for para in text.split("\n\n"):
        cur.append(para)
        size += len(para) + 2
        if size >= DOC_CHARS:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur and "".join(cur).strip():
        docs.append("\n\n".join(cur))
    return docs


def user_corpus(path_str: str) -> list[str]:
    """Documents from a text file or a directory of text files; binary or empty input is an error."""
    path = Path(path_str).expanduser()
    if not path.exists():
        raise DataError(f"--data {path_str}: no such file or directory")
    files = _text_files(path)
    if not files:
        raise DataError(f"--data {path_str}: the directory contains no files")
    docs: list[str] = []
    binary = []
    for f in files:
        text = _read_text(f)
        if text is None:
            binary.append(f)
            continue
        docs.extend(d for d in _chunk(text) if d.strip())
    if path.is_file() and binary:
        raise DataError(f"--data {path_str}: not a UTF-8 text file (binary content); give a text file")
    if not docs:
        what = "only binary files" if binary else "no text (the files are empty)"
        raise DataError(f"--data {path_str}: contains {what}; give UTF-8 text")
    return docs


def file_stats(path_str: str) -> dict[str, tuple[int, int]]:
    """Size and mtime (ns) of every file of a user corpus, to tell whether it changed while it was read."""
    out = {}
    for f in _text_files(Path(path_str).expanduser()):
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        out[str(f)] = (st.st_size, st.st_mtime_ns)
    return out


def check_unchanged(path_str: str, before: dict[str, tuple[int, int]]) -> None:
    """One-line DataError naming the first file that changed, appeared or vanished since `before`."""
    after = file_stats(path_str)
    for name in sorted(set(before) | set(after)):
        if before.get(name) == after.get(name):
            continue
        if name not in after:
            what = "was removed"
        elif name not in before:
            what = "appeared"
        else:
            what = f"changed ({before[name][0]} -> {after[name][0]} bytes)"
        raise DataError(
            f"--data {path_str}: {name} {what} while it was read; train on data that is not being written "
            "(copy it first)"
        )


def fingerprint(kind: str, path: str | None) -> str:
    """A cheap identity of the corpus source (file names, sizes, mtimes), for the cache key."""
    h = hashlib.blake2b(digest_size=16)
    if path is not None:
        files = _text_files(Path(path).expanduser())
        h.update(b"user")
    else:
        files = [f for root in embedded_roots(kind) for f in _python_files(root)]
        h.update(f"{kind}:{sys.version}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()
