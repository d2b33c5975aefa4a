"""The embedded default corpus: docstrings, so that training needs no download.

`stdlib` is the docstrings of the Python standard library (~1.6 MB of English prose and technical
text, identical on every install of the same Python version); `installed` adds every installed
package's (~30 MB here, varies by machine). Documents are docstrings, deduplicated, at least 40
characters long. User text (`--data PATH`) is read by data/files.py and data/tables.py.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

MIN_DOC_CHARS = 40
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


def embedded_fingerprint(kind: str) -> str:
    """A cheap identity of the embedded corpus (its files' names, sizes, mtimes), for cache keys."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{kind}:{sys.version}".encode())
    for f in (f for root in embedded_roots(kind) for f in _python_files(root)):
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()


__all__ = ["MIN_DOC_CHARS", "embedded_corpus", "embedded_fingerprint", "embedded_roots"]
