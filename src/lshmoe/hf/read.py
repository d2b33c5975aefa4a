"""A checkpoint directory's config.json as its transformers config, checked before anything is built."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lshmoe.hf.family import HFError, family_for
from lshmoe.hf.packaged import checkpoint_dir


def model_type_of(path: str | Path) -> str | None:
    """config.json's "model_type" of a checkpoint directory (or packaged checkpoint name)."""
    path = checkpoint_dir(path)
    if not (path / "config.json").is_file():
        raise HFError(
            f"{path}: no config.json; expected a Hugging Face checkpoint directory (config.json + *.safetensors)"
        )
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise HFError(f"{path}/config.json: unreadable ({e})") from None


def read_config(path: str | Path, check: Callable[[str | None], object] = family_for) -> Any:
    """The checkpoint's transformers config (config.json; never downloads). `check(model_type)` raises
    when the model is not one the caller can use (default: a supported MoE family)."""
    path = checkpoint_dir(path)
    check(model_type_of(path))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError) as e:
        raise HFError(f"{path}/config.json: {str(e).splitlines()[0][:200]}") from None
    return config


__all__ = ["model_type_of", "read_config"]
