"""`lshmoe export`: write a `train --hf` checkpoint as a Hugging Face checkpoint (experts gathered).

lshmoe export --checkpoint DIR --hf-out OUT [--overwrite] [--dtype auto|float32|bfloat16|float16]
"""

from __future__ import annotations

import sys
from pathlib import Path

from lshmoe.cliutil import Parser


def parser() -> Parser:
    p = Parser(
        prog="lshmoe export",
        description="Export a `train --hf` checkpoint (saved at any EP size) as sharded safetensors + config.json "
        "that transformers loads unchanged.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a checkpoints root with 'latest'")
    p.add_argument(
        "--hf-out",
        required=True,
        help="output directory: new or empty (never the source model's directory nor inside the checkpoint)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --hf-out, replacing the checkpoint there (its *.safetensors shards and "
        "model.safetensors.index.json are removed first, so no stale shard is left beside the new ones)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype of the written weights (and config.json's dtype); auto = the source checkpoint's",
    )
    return p


def export(checkpoint: str, out: str, *, overwrite: bool = False, dtype: str = "auto") -> Path:
    """The one call into the HF trainer's export (its home may move; this is the only call site)."""
    from lshmoe.hf.train import export_checkpoint

    return export_checkpoint(checkpoint, out, overwrite=overwrite, dtype=dtype)


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    out = export(a.checkpoint, a.hf_out, overwrite=a.overwrite, dtype=a.dtype)
    print(f"[lshmoe] exported {a.checkpoint} to {out}", file=sys.stderr)
    return 0
