"""`lshmoe export`: write a `train --hf` checkpoint as a Hugging Face checkpoint (experts gathered).

lshmoe export --checkpoint DIR --hf-out OUT
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
    p.add_argument("--hf-out", required=True, help="output directory")
    return p


def export(checkpoint: str, out: str) -> Path:
    """The one call into the HF trainer's export (its home may move; this is the only call site)."""
    from lshmoe.hf.train import export_checkpoint

    return export_checkpoint(checkpoint, out)


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    out = export(a.checkpoint, a.hf_out)
    print(f"[lshmoe] exported {a.checkpoint} to {out}", file=sys.stderr)
    return 0
