"""User files under `--data PATH`: which files, how their text is read, how it becomes documents.

    which      PATH itself when it is a file; for a directory every file below it, in sorted order,
               except hidden entries *inside* it (names starting with '.', e.g. .git/): the path
               given may itself lie under a dot-directory (~/.cache/x, /scratch/.data) or be `..`
    reading    strict UTF-8 (a UTF-8 BOM and CRLF line ends are accepted); anything else is a
               one-line DataError naming the file, the byte offset and an `iconv` command. A file
               with NUL bytes is binary: an error when it is PATH, skipped *with a message* in a
               directory (so a stray image or archive does not stop a run)
    documents  paragraphs (blank-line separated) packed into documents of about DOC_CHARS
               characters (less for a small corpus: about 1/TARGET_DOCS of it, so that it still
               gives TARGET_DOCS documents); a paragraph longer than that, e.g. a file with one
               sentence or record per line and no blank lines, is cut at line ends, so every file
               of some size gives many documents and the validation split (data/split.py) has
               documents to hold out

Files are read in blocks that end at a line end, so a multi-GB file never sits in memory whole.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lshmoe.errors import DataError

DOC_CHARS = 4000
TARGET_DOCS = 20
BLOCK_BYTES = 16 << 20
BINARY_PROBE = 65536


@dataclass(frozen=True)
class Listing:
    """The files of `--data PATH` and the hidden entries inside it that were left out."""

    files: list[Path]
    hidden: list[Path]


def list_files(path: Path) -> Listing:
    """PATH when it is a file, else every non-hidden file below it (hidden = a name inside PATH
    starting with '.'; the components of PATH itself are never looked at)."""
    if path.is_file():
        return Listing([path], [])
    files, hidden = [], []
    for dirpath, dirnames, filenames in os.walk(path):
        here = Path(dirpath)
        hidden += [here / d for d in dirnames if d.startswith(".")]
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            (hidden if name.startswith(".") else files).append(here / name)
    return Listing(sorted(files), sorted(hidden))


def say_hidden(shown: str, listing: Listing, log: Callable[[str], None]) -> None:
    if listing.hidden:
        names = ", ".join(str(p.name) + ("/" if p.is_dir() else "") for p in listing.hidden[:5])
        more = f" and {len(listing.hidden) - 5} more" if len(listing.hidden) > 5 else ""
        log(f"--data {shown}: skipped hidden entries inside it ({names}{more}); names starting with '.' are not read")


def _where(shown: str, f: Path) -> str:
    """'--data x.txt:' for the file given, '--data dir: dir/a.txt' for a file inside a directory."""
    return f"--data {shown}:" if Path(shown).expanduser() == f else f"--data {shown}: {f}"


def is_binary(f: Path) -> bool:
    """NUL bytes near the start (UTF-16 text is reported by `text_blocks`, not called binary)."""
    with open(f, "rb") as fh:
        head = fh.read(BINARY_PROBE)
    return b"\x00" in head and not head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))


def _not_utf8(shown: str, f: Path, data: bytes, base: int, line0: int, e: UnicodeDecodeError) -> DataError:
    offset = base + e.start
    line = line0 + data.count(b"\n", 0, e.start)
    return DataError(
        f"{_where(shown, f)} is not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {offset} (line {line}); "
        f"convert it first, e.g. iconv -f latin1 -t utf-8 '{f}' > '{f}.utf8' (name its real encoding after -f)"
    )


def text_blocks(shown: str, f: Path) -> Iterator[str]:
    """The text of `f` in blocks of about BLOCK_BYTES that end at a line end (CRLF -> LF)."""
    base, line0, rest = 0, 1, b""
    with open(f, "rb") as fh:
        first = True
        while True:
            chunk = fh.read(BLOCK_BYTES)
            if first:
                if chunk.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                    raise DataError(
                        f"{_where(shown, f)} is UTF-16 text; convert it to UTF-8 first, e.g. "
                        f"iconv -f utf-16 -t utf-8 '{f}' > '{f}.utf8'"
                    )
                if chunk.startswith(codecs.BOM_UTF8):
                    chunk, base = chunk[3:], 3
                first = False
            data = rest + chunk
            if not chunk:
                cut = len(data)
            else:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # NOTE: a line longer than a block: keep reading until it ends
                    rest = data
                    continue
            part, rest = data[:cut], data[cut:]
            try:
                text = part.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(shown, f, part, base, line0, e) from None
            base += len(part)
            line0 += part.count(b"\n")
            if text:
                yield text.replace("\r\n", "\n")
            if not chunk:
                return


def doc_chars(total_bytes: int) -> int:
    """The document size of a corpus of `total_bytes`: DOC_CHARS, or less so it makes TARGET_DOCS."""
    return max(1, min(DOC_CHARS, total_bytes // TARGET_DOCS))


def _units(para: str, size: int) -> Iterator[tuple[str, str]]:
    """(unit, separator before it): the paragraph, or its lines when it is longer than a document."""
    if len(para) <= size:
        yield para, "\n\n"
        return
    for i, line in enumerate(para.split("\n")):
        yield line, "\n\n" if i == 0 else "\n"


def documents(blocks: Iterator[str], target: int = DOC_CHARS) -> Iterator[str]:
    """Documents of about `target` characters cut at paragraph ends (at line ends inside a
    paragraph longer than that); whitespace-only documents are dropped."""
    parts: list[str] = []
    size = 0
    carry = ""

    def units_of(paras: list[str]) -> Iterator[tuple[str, str]]:
        for p in paras:
            if p.strip():
                yield from _units(p, target)

    def flush() -> Iterator[str]:
        nonlocal parts, size
        doc = "".join(parts)
        parts, size = [], 0
        if doc.strip():
            yield doc

    for block in blocks:
        paras = (carry + block).split("\n\n")
        carry = paras.pop()  # NOTE: the last paragraph may continue in the next block
        for unit, sep in units_of(paras):
            if parts:
                parts.append(sep)
            parts.append(unit)
            size += len(unit) + len(sep)
            if size >= target:
                yield from flush()
    for unit, sep in units_of([carry]):
        if parts:
            parts.append(sep)
        parts.append(unit)
        size += len(unit) + len(sep)
        if size >= target:
            yield from flush()
    yield from flush()


def file_stats(files: list[Path]) -> dict[str, tuple[int, int]]:
    """Size and mtime (ns) of every file, to tell whether one changed while it was read."""
    out = {}
    for f in files:
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        out[str(f)] = (st.st_size, st.st_mtime_ns)
    return out


def check_unchanged(shown: str, files: list[Path], before: dict[str, tuple[int, int]]) -> None:
    """One-line DataError naming the first file that changed, appeared or vanished since `before`."""
    after = file_stats(files)
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
            f"--data {shown}: {name} {what} while it was read; train on data that is not being written (copy it first)"
        )


def files_fingerprint(files: list[Path]) -> str:
    """A cheap identity of user files (names, sizes, mtimes), for cache keys."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"user")
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return h.hexdigest()


__all__ = [
    "DOC_CHARS",
    "Listing",
    "doc_chars",
    "check_unchanged",
    "documents",
    "file_stats",
    "files_fingerprint",
    "is_binary",
    "list_files",
    "say_hidden",
    "text_blocks",
]
