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


def _inside(a: Path, b: Path) -> bool:
    """`a` is `b` or lies inside it (both resolved)."""
    return a == b or b in a.parents


def check_destination(out: Path, checkpoint: str, path: Path, meta: dict) -> None:
    """Never write into what the export reads: the checkpoint (or the checkpoints root given), or the
    checkpoint's source model directory (`hf.source` of meta.json), whatever `--overwrite` says."""
    dest = out.expanduser().resolve()
    source = meta.get("hf", {}).get("source")
    if source and dest == Path(source).expanduser().resolve():
        raise ckpt.CheckpointError(
            f"--hf-out {out}: is the source model directory of this checkpoint ({source}); its weights would be "
            "replaced: write the fine-tune to a new directory"
        )
    for inside in (path.resolve(), Path(checkpoint).expanduser().resolve()):
        if _inside(dest, inside):
            raise ckpt.CheckpointError(
                f"--hf-out {out}: lies in the training checkpoint {checkpoint} (export would alter the files its "
                "manifest verifies); write to a new directory"
            )


def export_checkpoint(checkpoint: str, out: str, *, overwrite: bool = False, dtype: str = "auto") -> Path:
    """`lshmoe export`: a training checkpoint (any EP size) as a transformers checkpoint, in one process.
    `dtype` (float32, bfloat16, float16) casts the weights; auto = the source checkpoint's dtype."""
    from lshmoe.hf.export import DTYPES as EXPORT_DTYPES
    from lshmoe.hf.export import check_out_dir, export

    path = ckpt.find_checkpoint(checkpoint, "--checkpoint")
    meta = ckpt.read_meta(path)
    check_destination(Path(out), checkpoint, path, meta)
    check_out_dir(Path(out), overwrite, "--hf-out")
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
    name = str(getattr(config, "dtype", None) or "").replace("torch.", "") if dtype == "auto" else dtype
    cast = EXPORT_DTYPES.get(name) if dtype == "auto" else EXPORT_DTYPES[dtype]
    return export(model, Comm.local(), out, source=path / "hf", dtype=cast, overwrite=overwrite)


__all__ = ["export_checkpoint", "train_hf"]
