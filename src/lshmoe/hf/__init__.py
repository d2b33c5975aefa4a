"""Hugging Face MoE models made expert-parallel in one call.

    model = lshmoe.hf.from_pretrained("path/to/checkpoint", comm)    # Mixtral, Qwen2-MoE, Qwen3-MoE,
    out = lshmoe.hf.lm_loss(model, input_ids, targets)               # OLMoE, DeepSeek-V3
    lshmoe.hf.export(model, comm, "path/to/out")                     # a checkpoint transformers loads

`from_pretrained` builds the family's transformers model on the meta device from config.json, swaps
each sparse MoE block for lshmoe's expert-parallel layer holding this rank's experts only, and reads
from the safetensors files the dense weights and this rank's experts (hf/load.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lshmoe.distributed.comm import Comm
from lshmoe.hf.export import export
from lshmoe.hf.family import FAMILIES, HFError, family_for
from lshmoe.hf.load import load_weights
from lshmoe.hf.loss import lm_loss
from lshmoe.hf.model import HFMoEBlock, build_model, moe_blocks


def read_config(path: str | Path) -> Any:
    """The checkpoint's transformers config (config.json; never downloads)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise HFError(
            f"{path}: no config.json; expected a Hugging Face checkpoint directory (config.json + *.safetensors)"
        )
    import json

    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as e:
        raise HFError(f"{path}/config.json: unreadable ({e})") from None
    family_for(model_type)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, KeyError) as e:
        raise HFError(f"{path}/config.json: {str(e).splitlines()[0][:200]}") from None
    return config


def from_pretrained(
    path: str | Path,
    comm: Comm | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    overrides: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    settings: object = None,
) -> nn.Module:
    """A local checkpoint directory as an expert-parallel model (this rank's experts only);
    `settings`: a `Config` whose compressor / LocMoE / Lina sections the MoE layers use."""
    comm = comm or Comm.local()
    config = read_config(path)
    model, _ = build_model(
        config, comm, dtype=dtype, overrides=overrides, attn_implementation=attn_implementation, settings=settings
    )
    load_weights(model, path)
    return model


__all__ = [
    "FAMILIES",
    "HFError",
    "HFMoEBlock",
    "build_model",
    "export",
    "from_pretrained",
    "lm_loss",
    "load_weights",
    "moe_blocks",
    "read_config",
]
