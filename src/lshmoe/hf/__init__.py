"""Hugging Face MoE models made expert-parallel in one call.

    model = lshmoe.hf.from_pretrained("path/to/checkpoint", comm)    # Mixtral, Qwen2-MoE, Qwen3-MoE,
    out = lshmoe.hf.lm_loss(model, input_ids, targets)               # OLMoE, DeepSeek-V3
    lshmoe.hf.export(model, comm, "path/to/out")                     # a checkpoint transformers loads

`from_pretrained` builds the family's transformers model on the meta device from config.json, swaps
each sparse MoE block for lshmoe's expert-parallel layer holding this rank's experts only, and reads
from the safetensors files the dense weights and this rank's experts (hf/load.py). `FAMILIES` is the
table of supported families (hf/family.py), complete at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lshmoe.config import Config
from lshmoe.distributed.comm import Comm
from lshmoe.hf.export import export
from lshmoe.hf.family import FAMILIES, HFError
from lshmoe.hf.load import load_weights
from lshmoe.hf.loss import lm_loss
from lshmoe.hf.model import HFMoEBlock, build_model, moe_blocks
from lshmoe.hf.packaged import checkpoint_dir
from lshmoe.hf.read import read_config


def from_pretrained(
    path: str | Path,
    comm: Comm | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    overrides: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    settings: Config | None = None,
) -> nn.Module:
    """A local checkpoint directory as an expert-parallel model (this rank's experts only);
    `settings`: a `Config` whose compressor / LocMoE / Lina sections the MoE layers use."""
    comm = comm or Comm.local()
    path = checkpoint_dir(path)
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
    "checkpoint_dir",
    "export",
    "from_pretrained",
    "lm_loss",
    "load_weights",
    "moe_blocks",
    "read_config",
]
