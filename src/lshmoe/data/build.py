"""Records -> token store: split by document, tokenise, write (streaming; the corpus is never in RAM).

    pass 1   every record's split (data/split.py), from a hash of its text, or the data's own split
    (BPE)    lshmoe's own tokenizer is trained on the training records (only when none is given)
    pass 2   every record tokenised (text: documents + eos; SFT: chat-rendered ids + reply loss mask,
             data/chat.py) and appended to its split's files (data/store.py)

Both passes read the source again instead of holding it, so a GB-scale corpus costs the memory of a
batch of documents. The store is written to `<out>.part` and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lshmoe.data import store as S
from lshmoe.data.chat import ChatFormat, chat_format, encode_example, plain_render, render_text
from lshmoe.data.source import Records
from lshmoe.data.split import assign, is_val
from lshmoe.data.tokenizer import EOS, TextTokenizer, from_bpe, train_tokenizer
from lshmoe.errors import DataError

ENCODE_BATCH = 512


def _text(kind: str, rec: Any) -> str:
    return rec if kind == "text" else json.dumps(rec, sort_keys=True, ensure_ascii=False)


def split_flags(records: Records, fraction: float, shown: str) -> bytearray:
    """Pass 1: 1 = validation, per record in stream order."""
    flags, chars = bytearray(), 0
    for rec, forced in records.stream():
        text = _text(records.kind, rec)
        flags.append(1 if forced == "val" else 0 if forced == "train" else int(is_val(text, fraction)))
        chars += len(text)
    unit = "document" if records.kind == "text" else "example"
    return assign(flags, records.forced, fraction, shown, chars, unit)


def _again(records: Records, n: int, changed: Callable[[], None], shown: str) -> Iterator[tuple[int, Any]]:
    """The records once more, numbered; a different count than pass 1's means the source changed."""
    i = -1
    for i, (rec, _) in enumerate(records.stream()):
        if i >= n:
            break
        yield i, rec
    if i + 1 != n:
        changed()
        raise DataError(f"--data {shown}: its content changed while it was read; train on data not being written")


def _train_texts(records: Records, flags: bytearray, changed: Callable[[], None], shown: str) -> Iterator[str]:
    fmt = ChatFormat(plain_render(EOS), "plain")
    for i, rec in _again(records, len(flags), changed, shown):
        if not flags[i]:
            yield rec if records.kind == "text" else render_text(fmt, rec)


def build_store(
    records: Records,
    tok: TextTokenizer | None,
    vocab_size: int,
    out: Path,
    *,
    fraction: float,
    shown: str,
    log: Callable[[str], None],
    before_finish: Callable[[], None] | None = None,
    started: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Write the store of `records` into `out` (with lshmoe's own BPE of `vocab_size` when `tok` is
    None); `before_finish` may veto (a source file changed meanwhile); `started()` is called once the
    records have split (too little text is an error before it). Returns its data.json."""
    t0 = time.perf_counter()
    changed = before_finish or (lambda: None)
    flags = split_flags(records, fraction, shown)
    if started is not None:
        started()
    if tok is None:
        tok = from_bpe(train_tokenizer(_train_texts(records, flags, changed, shown), vocab_size))
    sft = records.kind == "sft"
    fmt = chat_format(tok) if sft else None
    tmp = out.with_name(out.name + ".part")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    writers = {s: S.SplitWriter(tmp, s, S.token_dtype(tok.vocab_size), sft) for s in S.SPLITS}
    batch: list[tuple[str, int]] = []

    def flush() -> None:
        for ids, (doc, v) in zip(tok.encode_docs([d for d, _ in batch]), batch, strict=True):
            writers["val" if v else "train"].add(ids, len(doc))
        batch.clear()

    for i, rec in _again(records, len(flags), changed, shown):
        if sft:
            ids, mask = encode_example(tok, fmt, rec, shown, i)
            writers["val" if flags[i] else "train"].add(ids, len(_text("sft", rec)), mask)
            continue
        batch.append((rec, flags[i]))
        if len(batch) >= ENCODE_BATCH:
            flush()
    flush()
    for note in records.notes:
        log(note)
    stats = {s: w.close() for s, w in writers.items()}
    if before_finish is not None:
        before_finish()
    meta = {
        "kind": records.kind,
        "source": shown,
        "what": records.what,
        "val_fraction": fraction,
        "own_split": records.forced,
        "dtype": S.token_dtype(tok.vocab_size).name,
        "tokenizer": {
            "digest": tok.digest,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "origin": tok.origin,
            "chat": fmt.name if fmt else None,
        },
        "splits": stats,
    }
    S.finish(tmp, out, meta, tok.json_text)
    tr, va = stats["train"], stats["val"]
    unit = "examples" if sft else "documents"
    log(
        f"tokenised {shown} ({records.what}): {tr['documents']}+{va['documents']} {unit}, "
        f"{(tr['chars'] + va['chars']) / 1e6:.1f} M chars, {tr['tokens']} training + {va['tokens']} validation "
        f"tokens, vocab {tok.vocab_size}, in {time.perf_counter() - t0:.1f} s"
    )
    return S.read_meta(out)


__all__ = ["build_store", "split_flags"]
