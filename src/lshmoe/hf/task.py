"""What `train --hf` does with a checkpoint, chosen by its model type.

    an MoE family (hf/family.py)  fine-tune: the checkpoint's causal LM made expert-parallel
                                  (hf/model.py), next-token targets, its weights read by hf/load.py
    bert (dense)                  upcycle: every n-th FFN made an MoE of copies (hf/upcycle.py), a
                                  masked-LM head, BERT's masked-LM batches (hf/mlm.py)

Both then train through the same loop (hf/train.py's HFTrainer) and loss (hf/loss.py's lm_loss);
a task is the three things that differ: how the config is read, how the model is built and given
its starting weights, and what a batch is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lshmoe.config import DTYPES, Config, ConfigError, MoEConfig
from lshmoe.distributed.comm import Comm
from lshmoe.hf.load import load_weights
from lshmoe.hf.mlm import MaskedData, mask_spec
from lshmoe.hf.model import build_model
from lshmoe.hf.read import model_type_of, read_config
from lshmoe.hf.upcycle import read_bert_config, upcycle_bert
from lshmoe.train.data import TokenData

# Set by an MoE checkpoint: a fine-tuning run cannot change them.
SHAPE_FIELDS = ("num_experts", "top_k", "d_expert", "activation", "expert_bias")


def moe_overrides(cfg: MoEConfig) -> dict[str, Any]:
    """The moe.* fields a run set away from their defaults: they override the checkpoint's routing."""
    default = MoEConfig()
    out = {}
    for f in dataclasses.fields(MoEConfig):
        v = getattr(cfg, f.name)
        if v != getattr(default, f.name) and f.name != "ep_size":
            if f.name in SHAPE_FIELDS:
                raise ConfigError(f"moe.{f.name}={v}: with --hf the checkpoint sets it; leave it unset")
            out[f.name] = v
    return out


# (config, checkpoint dir, run config, comm, starting weights wanted) -> (model, its MoEConfig)
Builder = Callable[[Any, Path, Config, Comm, bool], tuple[nn.Module, MoEConfig]]


@dataclass(frozen=True, kw_only=True)
class HFTask:
    name: str
    read_config: Callable[[Path], Any]
    build: Builder  # a resumed run passes False: the checkpoint supplies the weights
    batches: Callable[[TokenData, Path, Config, int], Any]  # token windows -> the task's batches


def _fine_tune_build(config: Any, path: Path, cfg: Config, comm: Comm, load: bool) -> tuple[nn.Module, MoEConfig]:
    model, mcfg = build_model(
        config, comm, dtype=DTYPES[cfg.train.dtype], overrides=moe_overrides(cfg.moe), settings=cfg
    )
    if load:
        load_weights(model, path)
    return model, mcfg


def _upcycle_build(config: Any, path: Path, cfg: Config, comm: Comm, load: bool) -> tuple[nn.Module, MoEConfig]:
    # NOTE: the experts are made from the dense weights, so they are read even when a checkpoint follows
    return upcycle_bert(path, comm, cfg, dtype=DTYPES[cfg.train.dtype])


FINE_TUNE = HFTask(
    name="fine-tune",
    read_config=read_config,
    build=_fine_tune_build,
    batches=lambda data, path, cfg, vocab: data,
)
UPCYCLE = HFTask(
    name="upcycle",
    read_config=read_bert_config,
    build=_upcycle_build,
    batches=lambda data, path, cfg, vocab: MaskedData(data, mask_spec(path, vocab, cfg.upcycle.mask_prob)),
)


def task_for(path: str | Path) -> HFTask:
    """Upcycling for a dense BERT checkpoint, fine-tuning for anything else (an MoE family or an error)."""
    return UPCYCLE if model_type_of(path) == "bert" else FINE_TUNE


__all__ = ["FINE_TUNE", "UPCYCLE", "HFTask", "moe_overrides", "task_for"]
