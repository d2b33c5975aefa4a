"""Tabular data through the `datasets` package: JSONL / JSON, parquet and Arrow files, and a dataset
directory written by `save_to_disk`.

    files     loaded with datasets' packaged builders (json, parquet, arrow), converted once into its
              Arrow cache under the lshmoe cache directory, then memory-mapped: rows are read in
              batches, never the whole table into Python
    saved     `datasets.load_from_disk`; a DatasetDict gives its `train` split, and its `validation`
              (or `test`) split as the held-out data when it has one
    columns   text: `data.field` (default "text"), one document per row. SFT (data/chat.py): a
              `messages` column (a list of {role, content}) or `prompt` + `response` (or `completion`)
              columns, with an optional `system` column. A missing column is one line naming the
              columns that exist.

`datasets` is imported only here and only when such data is given (pip install 'lshmoe[data]').
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lshmoe.errors import DataError

# file suffix -> datasets' packaged builder
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
SAVED_MARKERS = ("dataset_dict.json", "state.json")
RESPONSE_COLUMNS = ("response", "completion")
ROWS_PER_BATCH = 1024


def is_table(f: Path) -> bool:
    return f.suffix.lower() in BUILDERS


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / m).is_file() for m in SAVED_MARKERS)


def _datasets(shown: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"--data {shown}: reading JSONL / parquet / Arrow / saved datasets needs the datasets package "
            "(pip install 'lshmoe[data]')"
        ) from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _first_line(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    msg = str(e).strip() or (str(cause).strip() if cause else "") or type(e).__name__
    return msg.splitlines()[0][:200]


@dataclass
class Tables:
    """The rows of `--data`: the training table and, when the data has one, its own held-out table."""

    train: Any  # datasets.Dataset
    val: Any | None
    what: str  # for messages: "3 JSONL files", "a saved dataset"

    @property
    def columns(self) -> list[str]:
        return list(self.train.column_names)


def load_files(shown: str, files: list[Path], cache_dir: Path) -> Tables:
    """JSONL / parquet / Arrow files as one table (every file must have the same columns)."""
    ds_mod = _datasets(shown)
    parts = []
    for f in files:
        builder = BUILDERS[f.suffix.lower()]
        try:
            ds = ds_mod.load_dataset(builder, data_files=[str(f)], split="train", cache_dir=str(cache_dir))
        except Exception as e:  # noqa: BLE001 - any parse failure of the file: one line naming it
            kind = {"json": "JSON lines", "parquet": "parquet", "arrow": "Arrow"}[builder]
            raise DataError(f"--data {shown}: cannot read {f} as {kind}: {_first_line(e)}") from None
        if parts and ds.column_names != parts[0].column_names:
            raise DataError(
                f"--data {shown}: {f} has columns {ds.column_names}, {files[0]} has {parts[0].column_names}; "
                "the files of one --data must have the same columns"
            )
        parts.append(ds)
    table = parts[0] if len(parts) == 1 else ds_mod.concatenate_datasets(parts)
    return Tables(train=table, val=None, what=f"{len(files)} table file{'s' if len(files) > 1 else ''}")


def load_saved(shown: str, path: Path) -> Tables:
    """A `save_to_disk` directory: a Dataset, or a DatasetDict's train (+ validation or test) split."""
    ds_mod = _datasets(shown)
    try:
        ds = ds_mod.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - a damaged or foreign directory: one line
        raise DataError(f"--data {shown}: cannot load it as a saved dataset: {_first_line(e)}") from None
    if isinstance(ds, ds_mod.DatasetDict):
        if "train" not in ds:
            raise DataError(f"--data {shown}: the saved dataset has splits {list(ds)}, none named 'train'")
        val = next((ds[s] for s in ("validation", "test") if s in ds), None)
        return Tables(train=ds["train"], val=val, what="a saved dataset")
    return Tables(train=ds, val=None, what="a saved dataset")


def check_text_column(shown: str, tables: Tables, field: str) -> None:
    """`field` must be a string column of every table."""
    for t in (tables.train, tables.val):
        if t is None:
            continue
        if field not in t.column_names:
            raise DataError(
                f"--data {shown}: no column {field!r} (data.field, --data-field); its columns are: "
                f"{', '.join(t.column_names)}"
            )
        dtype = getattr(t.features[field], "dtype", None)
        if dtype not in ("string", "large_string"):
            raise DataError(f"--data {shown}: column {field!r} holds {t.features[field]}, not text; pick a text column")


def sft_layout(columns: list[str]) -> str | None:
    """'messages' or 'prompt' (prompt + response/completion columns), or None when neither is there."""
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and any(c in columns for c in RESPONSE_COLUMNS):
        return "prompt"
    return None


def text_rows(table: Any, field: str) -> Iterator[str | None]:
    """The `field` of every row, in order (None for a null)."""
    for batch in table.select_columns([field]).iter(batch_size=ROWS_PER_BATCH):
        yield from batch[field]


def sft_rows(shown: str, table: Any) -> Iterator[list[dict[str, str]]]:
    """Every row as a conversation: a list of {role, content} messages."""
    cols = table.column_names
    layout = sft_layout(cols)
    if layout == "messages":
        for i, batch in enumerate(table.select_columns(["messages"]).iter(batch_size=ROWS_PER_BATCH)):
            for j, msgs in enumerate(batch["messages"]):
                yield _check_messages(shown, i * ROWS_PER_BATCH + j, msgs)
        return
    resp = next(c for c in RESPONSE_COLUMNS if c in cols)
    keep = ["prompt", resp] + (["system"] if "system" in cols else [])
    for i, batch in enumerate(table.select_columns(keep).iter(batch_size=ROWS_PER_BATCH)):
        for j in range(len(batch["prompt"])):
            prompt, response = batch["prompt"][j], batch[resp][j]
            if not isinstance(prompt, str) or not isinstance(response, str):
                raise DataError(
                    f"--data {shown}: row {i * ROWS_PER_BATCH + j}: prompt and {resp} must be text, got "
                    f"{type(prompt).__name__} and {type(response).__name__}"
                )
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            system = batch["system"][j] if "system" in batch else None
            yield ([{"role": "system", "content": system}] if system else []) + msgs


def _check_messages(shown: str, row: int, msgs: Any) -> list[dict[str, str]]:
    ok = isinstance(msgs, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
    )
    if not ok:
        raise DataError(f"--data {shown}: row {row}: messages must be a list of {{role, content}} with text values")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"--data {shown}: row {row}: the conversation has no assistant message to learn")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


__all__ = [
    "BUILDERS",
    "Tables",
    "check_text_column",
    "is_saved_dataset",
    "is_table",
    "load_files",
    "load_saved",
    "sft_layout",
    "sft_rows",
    "text_rows",
]
