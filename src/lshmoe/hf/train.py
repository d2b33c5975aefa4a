"""`lshmoe train --hf PATH` and `lshmoe export`: what is HF-specific about running and exporting.

Training is the one loop (train/loop.py) over the checkpoint's task (hf/task.py): fine-tuning an MoE
family's causal LM, or upcycling a dense BERT into an MoE masked LM. Export turns a `train --hf`
checkpoint, saved at any EP size, into a checkpoint transformers loads unchanged, in one process.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lshmoe.config import DTYPES, Config, MoEConfig, TrainConfig
from lshmoe.distributed.comm import Comm
from lshmoe.hf.model import build_model
from lshmoe.hf.read import read_config
from lshmoe.hf.task import moe_overrides, task_for
from lshmoe.train import checkpoint as ckpt
from lshmoe.train.loop import TrainResult, run_job
from lshmoe.train.optim import build_optimizer


def train_hf(cfg: Config) -> TrainResult:
    """One rank of a `train --hf` job."""
    return run_job(cfg, task_for(cfg.model.hf))


def export_checkpoint(checkpoint: str, out: str) -> Path:
    """`lshmoe export`: a training checkpoint (any EP size) as a transformers checkpoint, in one process."""
    from lshmoe.hf.export import export

    path = ckpt.find_checkpoint(checkpoint, "--checkpoint")
    meta = ckpt.read_meta(path)
    if "hf" not in meta or not (path / "hf" / "config.json").is_file():
        raise ckpt.CheckpointError(f"--checkpoint {path}: not a train --hf checkpoint (no hf/config.json)")
    if meta["model"].get("hf.model_type") == "bert":
        raise ckpt.CheckpointError(
            f"--checkpoint {path}: an upcycled BERT has MoE layers that transformers' BERT classes cannot hold, "
            "so there is no checkpoint transformers would load unchanged; export writes the MoE families "
            "(mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3)"
        )
    ckpt.verify_files(path)
    run = meta["config"]
    config = read_config(path / "hf")
    moe = MoEConfig(**{k: v for k, v in run["moe"].items() if k in {f.name for f in dataclasses.fields(MoEConfig)}})
    model, _ = build_model(config, Comm.local(), dtype=DTYPES[meta["hf"]["dtype"]], overrides=moe_overrides(moe))
    entries = ckpt.state_entries(model, build_optimizer(model, TrainConfig()), 0, {})
    ckpt.load(path, {k: v for k, v in entries.items() if k.startswith("model/")})
    return export(model, Comm.local(), out, source=path / "hf")


__all__ = ["export_checkpoint", "train_hf"]
