"""What `lshmoe infer` can serve: the check both the command and the engine make before loading."""

from __future__ import annotations

from pathlib import Path

from lshmoe.errors import UserError


def check_servable(path: Path, meta: dict) -> None:
    """`lshmoe infer` serves lshmoe's GPT-MoE: a `train --hf` checkpoint is one line saying what to do."""
    if "hf" in meta:
        kind = meta["model"].get("hf.model_type", "Hugging Face")
        raise UserError(
            f"--checkpoint {path}: a train --hf checkpoint ({kind}); lshmoe infer serves GPT-MoE checkpoints. "
            f"Write it as a Hugging Face checkpoint with lshmoe export --checkpoint {path} --hf-out DIR and load "
            "that with transformers"
        )
