"""What `--data` (or the embedded corpus) holds, as a stream of records to split and tokenise.

`open_source` is cheap (it lists and stats files, for the cache key); `Source.load` reads: it
decides the kind of the data and returns a re-iterable stream of records, each a text document or
an SFT conversation, with the split the data itself assigns (a saved DatasetDict's validation
split) or None (the hash decides, data/split.py).

    embedded corpus       text: its docstrings (data/corpus.py); SFT is refused
    text files            text (data/files.py); --data-format sft is refused (examples need columns)
    table files / saved   data.format auto: text when the data.field column exists, else SFT when it
                          has messages or prompt + response columns (data/tables.py); text / sft force it
A directory that mixes text files and table files is refused (a README beside the JSONL files
would otherwise become training text).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lshmoe.config import DataConfig
from lshmoe.data import files as F
from lshmoe.data import tables as T
from lshmoe.data.corpus import embedded_corpus, embedded_fingerprint
from lshmoe.errors import DataError

Record = tuple[Any, str | None]  # (a document str or a conversation, "train" / "val" / None)


@dataclass
class Records:
    """A stream of records of one kind; `stream()` starts it again (the build reads it twice)."""

    kind: str  # "text" or "sft"
    stream: Callable[[], Iterator[Record]]
    forced: bool  # the data brings its own validation split
    what: str  # "12 text files", "a saved dataset (messages)", "embedded:stdlib"
    notes: list[str] = field(default_factory=list)  # said once while streaming (rows skipped, ...)


@dataclass
class Source:
    shown: str  # how the user named it: the --data value or embedded:<corpus>
    path: Path | None
    listing: F.Listing | None
    fingerprint: str
    cfg: DataConfig

    @property
    def files(self) -> list[Path]:
        return self.listing.files if self.listing else []

    def load(self, cache_dir: Path, log: Callable[[str], None]) -> Records:
        dc = self.cfg
        if self.path is None:
            if dc.format == "sft":
                raise DataError("data.format=sft needs --data with SFT examples (JSONL / parquet / a saved dataset)")
            docs = embedded_corpus(dc.corpus)
            return Records("text", lambda: ((d, None) for d in docs), False, self.shown)
        if T.is_saved_dataset(self.path):
            return _table_records(self.shown, T.load_saved(self.shown, self.path), dc)
        tables = [f for f in self.files if T.is_table(f)]
        texts = [f for f in self.files if not T.is_table(f)]
        if tables and texts:
            raise DataError(
                f"--data {self.shown}: holds both text files ({', '.join(f.name for f in texts[:3])}) and table "
                f"files ({', '.join(f.name for f in tables[:3])}); point --data at one kind"
            )
        if tables:
            return _table_records(self.shown, T.load_files(self.shown, tables, cache_dir / "datasets"), dc)
        if dc.format == "sft":
            raise DataError(
                f"--data {self.shown}: data.format=sft needs SFT examples in a table (JSONL / parquet / Arrow / a "
                "saved dataset with messages or prompt + response columns), not text files"
            )
        return _text_records(self.shown, self.path, texts, log)


def open_source(dc: DataConfig, log: Callable[[str], None]) -> Source:
    """The source `dc` names; a missing or empty path is a one-line DataError."""
    if dc.path is None:
        return Source(f"embedded:{dc.corpus}", None, None, embedded_fingerprint(dc.corpus), dc)
    path = Path(dc.path).expanduser()
    if not path.exists():
        raise DataError(f"--data {dc.path}: no such file or directory")
    listing = F.list_files(path)
    F.say_hidden(dc.path, listing, log)
    if not listing.files:
        only = " (only hidden entries, which are not read)" if listing.hidden else ""
        raise DataError(f"--data {dc.path}: the directory contains no files{only}")
    return Source(dc.path, path, listing, F.files_fingerprint(listing.files), dc)


def _text_records(shown: str, path: Path, texts: list[Path], log: Callable[[str], None]) -> Records:
    binary = [f for f in texts if F.is_binary(f)]
    if path.is_file() and binary:
        raise DataError(f"--data {shown}: not a text file (binary content: NUL bytes); give UTF-8 text")
    readable = [f for f in texts if f not in binary]
    if not readable:
        raise DataError(f"--data {shown}: contains only binary files (NUL bytes); give UTF-8 text")
    if binary:
        names = ", ".join(str(f.relative_to(path)) for f in binary[:5])
        log(f"--data {shown}: skipped {len(binary)} binary file(s) (NUL bytes): {names}")

    target = F.doc_chars(sum(f.stat().st_size for f in readable))

    def stream() -> Iterator[Record]:
        for f in readable:
            for doc in F.documents(F.text_blocks(shown, f), target):
                yield doc, None

    n = len(readable)
    return Records("text", stream, False, f"{n} text file{'s' if n > 1 else ''}")


def _table_records(shown: str, t: T.Tables, dc: DataConfig) -> Records:
    if t.val is not None and len(t.val) == 0:
        t.val = None
    layout = T.sft_layout(t.columns)
    kind = dc.format
    if kind == "auto":
        kind = "text" if dc.field in t.columns else ("sft" if layout else "text")
    if kind == "text":
        if dc.format == "auto" and dc.field not in t.columns:
            raise DataError(
                f"--data {shown}: no column {dc.field!r} (data.field, --data-field) and no SFT columns (messages, or "
                f"prompt + response); its columns are: {', '.join(t.columns)}"
            )
        T.check_text_column(shown, t, dc.field)
        return _text_table(shown, t, dc.field)
    if layout is None:
        raise DataError(
            f"--data {shown}: data.format=sft needs a messages column, or prompt and response (or completion) "
            f"columns; its columns are: {', '.join(t.columns)}"
        )
    tables = [(t.train, "train" if t.val is not None else None)] + ([(t.val, "val")] if t.val is not None else [])

    def stream() -> Iterator[Record]:
        for table, split in tables:
            for msgs in T.sft_rows(shown, table):
                yield msgs, split

    return Records("sft", stream, t.val is not None, f"{t.what} ({layout} column{'s' if layout == 'prompt' else ''})")


def _text_table(shown: str, t: T.Tables, fld: str) -> Records:
    tables = [(t.train, "train" if t.val is not None else None)] + ([(t.val, "val")] if t.val is not None else [])
    rec = Records("text", lambda: iter(()), t.val is not None, f"{t.what} (column {fld!r})")

    def stream() -> Iterator[Record]:
        empty = 0
        for table, split in tables:
            for text in T.text_rows(table, fld):
                if text is None or not text.strip():
                    empty += 1
                    continue
                yield text, split
        note = f"--data {shown}: skipped {empty} row(s) whose {fld!r} is empty or null"
        if empty and note not in rec.notes:
            rec.notes.append(note)

    rec.stream = stream
    return rec


__all__ = ["Record", "Records", "Source", "open_source"]
