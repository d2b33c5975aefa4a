"""`lshmoe data`: tokenise a corpus once into token shards that training memory-maps.

    lshmoe data prepare --data PATH --out DIR [--hf CHECKPOINT | --tokenizer PATH | --vocab-size N]
                        [--data-field text] [--data-format auto|text|sft] [--val-fraction 0.05]
    lshmoe data verify DIR        re-hash every file of DIR against its manifest (SHA-256)

`prepare` reads --data (text files, JSONL / parquet / Arrow, a saved dataset) as `train --data`
would, splits it into training and validation by document, tokenises it with the HF checkpoint's
tokenizer (`--hf`, for `train --hf`), a given tokenizer.json (`--tokenizer`), or a new lshmoe BPE of
`--vocab-size` tokens (for the GPT-MoE), and writes DIR (data/store.py). `train --data DIR` then
starts without reading or tokenising text; a store made with another tokenizer than the model's is
refused in one line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lshmoe.config import DataConfig
from lshmoe.config.validate import validate_data
from lshmoe.data import store as S
from lshmoe.data.build import build_store
from lshmoe.data.files import check_unchanged, file_stats
from lshmoe.data.load import cache_root
from lshmoe.data.source import open_source
from lshmoe.data.tokenizer import load_tokenizer
from lshmoe.errors import DataError, UserError

DEFAULTS = DataConfig()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (the CLI prints UserError)
        raise UserError(f"{self.prog}: {message}")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lshmoe data", description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    pr = sub.add_parser("prepare", help="tokenise --data once into token shards (numpy memmap + index + manifest)")
    pr.add_argument("--data", required=True, help="text file or directory, JSONL / parquet / Arrow file, saved dataset")
    pr.add_argument("--out", required=True, type=Path, help="directory to write (new or empty)")
    tok = pr.add_mutually_exclusive_group()
    tok.add_argument("--hf", help="HF checkpoint directory: tokenise with its tokenizer.json (and chat template)")
    tok.add_argument("--tokenizer", help="a tokenizer.json, or a directory with one (and tokenizer_config.json)")
    pr.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULTS.vocab_size,
        help=f"without --hf / --tokenizer: train an lshmoe BPE of this size [default: {DEFAULTS.vocab_size}]",
    )
    pr.add_argument("--data-field", default=DEFAULTS.field, help=f"text column [default: {DEFAULTS.field}]")
    pr.add_argument("--data-format", default=DEFAULTS.format, choices=("auto", "text", "sft"), help="[default: auto]")
    pr.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULTS.val_fraction,
        help=f"documents held out for validation [default: {DEFAULTS.val_fraction}]",
    )
    pr.add_argument("--cache-dir", help="where datasets' Arrow conversions go [default: $XDG_CACHE_HOME/lshmoe]")
    pr.add_argument("--overwrite", action="store_true", help="replace DIR when it already holds token shards")
    ve = sub.add_parser("verify", help="re-hash every file of a token shard directory against its manifest")
    ve.add_argument("dir", type=Path)
    return p


def prepare(a: argparse.Namespace, log=print) -> Path:
    dc = DataConfig(
        path=a.data,
        vocab_size=a.vocab_size,
        val_fraction=a.val_fraction,
        cache_dir=a.cache_dir,
        field=a.data_field,
        format=a.data_format,
    )
    validate_data(dc)
    out = a.out.expanduser()
    S.check_not_a_store_dir(out, a.overwrite)
    if a.hf or a.tokenizer:
        tok = load_tokenizer(Path(a.hf or a.tokenizer), "--hf" if a.hf else "--tokenizer")
    else:
        tok = None
    src = open_source(dc, log)
    if src.path is not None and S.is_store(src.path):
        raise DataError(f"--data {a.data}: already holds token shards; train on it directly")
    stats = file_stats(src.files)
    t0 = time.perf_counter()
    records = src.load(cache_root(dc), log)
    build_store(
        records,
        tok,
        dc.vocab_size,
        out,
        fraction=dc.val_fraction,
        shown=a.data,
        log=log,
        before_finish=lambda: check_unchanged(a.data, src.files, stats),
    )
    log(f"wrote token shards to {out} in {time.perf_counter() - t0:.1f} s; train with --data {out}")
    return out


def verify(path: Path) -> None:
    if not S.is_store(path):
        raise DataError(f"{path}: not a token shard directory (no data.json and manifest.json)")
    why = S.damage(path, full=True)
    if why is not None:
        raise S.fail(str(path), path, why)
    print(f"{path}: every file matches its manifest")


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.cmd == "prepare":
        prepare(a, lambda m: print(f"[lshmoe] {m}", file=sys.stderr, flush=True))
    else:
        verify(a.dir)
    return 0


if __name__ == "__main__":  # NOTE: `lshmoe data` is the entry point; this serves `python -m` in tests
    try:
        sys.exit(main())
    except UserError as e:
        print(f"lshmoe: error: {e}", file=sys.stderr)
        sys.exit(2)
