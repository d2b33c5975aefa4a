"""The tasks of `train --hf`, chosen by the checkpoint's model type (train/task.py is the seam):

    an MoE family (hf/family.py)  FineTune: the checkpoint's causal LM made expert-parallel
                                  (hf/model.py), next-token targets, its weights read by hf/load.py
    bert (dense)                  Upcycle: every n-th FFN made an MoE of copies (hf/upcycle.py), a
                                  masked-LM head, BERT's masked-LM batches (hf/mlm.py), and the FFN
                                  inputs captured after training when `upcycle.capture` asks

Both train through the one loop (train/loop.py) on transformers' loss (hf/loss.py's lm_loss). Their
checkpoints carry the transformers config and tokenizer files under `hf/` (inside the manifest), so
`lshmoe export` needs nothing else; a checkpoint resumes only into the same model (type and config
digest), at any EP size that divides its experts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lshmoe.config import DTYPES, Config, ConfigError, MoEConfig, validate, validate_ep
from lshmoe.data import TokenData, hf_token_data
from lshmoe.distributed.comm import Comm
from lshmoe.hf.capture import capture_ffn_inputs
from lshmoe.hf.export import SIDE_FILES
from lshmoe.hf.load import load_weights
from lshmoe.hf.loss import lm_loss
from lshmoe.hf.mlm import MaskedData, mask_spec
from lshmoe.hf.model import build_model, materialize_model, moe_blocks
from lshmoe.hf.packaged import checkpoint_dir
from lshmoe.hf.read import model_type_of, read_config
from lshmoe.hf.upcycle import read_bert_config, upcycle_bert
from lshmoe.hf.weights import check_weight_files
from lshmoe.train.task import Log, StepOutput, TaskBase, params_line

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


def config_digest(config: Any) -> str:
    """A short digest of a transformers config (the fields that define the model)."""
    d = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in ("transformers_version",)}
    return hashlib.blake2b(json.dumps(d, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


class HFTask(TaskBase):
    """What fine-tuning and upcycling share: the checkpoint directory, its config, the loss, the
    checkpoint signature and side files."""

    def __init__(self, src: Path):
        self.src = src
        self.cfg: Config | None = None
        self.hf_config: Any = None

    def read_config(self, path: Path) -> Any:
        raise NotImplementedError

    def batches(self, tokens: TokenData) -> Any:
        return tokens

    weights_required = True  # the model's weights come from the safetensors files

    def check(self, cfg: Config, world_size: int) -> Any:
        """What can be checked before any tensor is read (the launching process and every rank): the
        config for this world (the experts divide by EP once the model is built: the checkpoint sets
        E), the checkpoint's config.json and whole weight files. Returns its transformers config."""
        ep = max(1, cfg.moe.ep_size or world_size)
        validate(cfg, world_size if cfg.moe.num_experts % ep == 0 else None)
        validate_ep(cfg.moe, world_size)
        if cfg.model.arch != "gpt":
            raise ConfigError(f"model.arch={cfg.model.arch}: with --hf the model is the checkpoint's own (arch gpt)")
        hf_config = self.read_config(self.src)
        check_weight_files(self.src, self.weights_required)
        return hf_config

    def setup(self, cfg: Config, comm: Comm, log: Log) -> Any:
        self.hf_config = self.check(cfg, comm.world_size)
        self.cfg = cfg
        max_pos = getattr(self.hf_config, "max_position_embeddings", None)
        if max_pos is not None and cfg.model.seq_len > max_pos:
            raise ConfigError(f"model.seq_len={cfg.model.seq_len} is out of range; the checkpoint allows <= {max_pos}")
        return self.batches(hf_token_data(self.src, cfg, self.hf_config.vocab_size, log))

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        out = lm_loss(model, x, y)
        moe = {i: b.last_out for i, b in moe_blocks(model)}
        return StepOutput(loss=out["loss"], ce=out["ce"], aux=out["aux"], moe=moe)

    def moe_layers(self, model: nn.Module) -> list[nn.Module]:
        return [b.moe for _, b in moe_blocks(model)]

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The decoder layers (an MoE family) or the encoder layers (an upcycled BERT)."""
        body = model.bert.encoder if hasattr(model, "bert") else model.model
        return list(body.layer if hasattr(body, "layer") else body.layers)

    def signature(self) -> dict[str, Any]:
        return {"hf.model_type": self.hf_config.model_type, "hf.config": config_digest(self.hf_config)}

    def meta(self) -> dict[str, Any]:
        return {"hf": {"source": str(self.src.resolve()), "dtype": self.cfg.train.dtype, "task": self.name}}

    def write_side_files(self, directory: Path) -> None:
        """What `lshmoe export` needs besides the weights: the config and the tokenizer files."""
        (directory / "hf").mkdir(exist_ok=True)
        self.hf_config.save_pretrained(str(directory / "hf"))
        for f in SIDE_FILES:
            if (self.src / f).is_file():
                shutil.copy2(self.src / f, directory / "hf" / f)

    def describe(self, model: nn.Module) -> str:
        mcfg = model.moe_cfg
        return (
            f"{self.hf_config.model_type} from {self.src} ({self.name}), {params_line(model)}, "
            f"{len(moe_blocks(model))} MoE layers x {mcfg.num_experts} experts (top-{mcfg.top_k})"
        )


class FineTune(HFTask):
    """An HF MoE checkpoint's causal LM, made expert-parallel, trained on next-token targets."""

    name = "fine-tune"
    # NOTE: full fine-tuning of pretrained LLM weights with AdamW is run at 1e-5 to 2e-5 in the published
    # recipes; 3e-3, a from-scratch rate, moves the weights far from what they learnt within a few steps
    default_lr = 1e-5
    save_at_end = True  # a fine-tune is kept, ready for `lshmoe export`

    def read_config(self, path: Path) -> Any:
        return read_config(path)

    def build(self, cfg: Config, comm: Comm, fresh: bool) -> nn.Module:
        """Under FSDP the model stays on the meta device until the loop has sharded it."""
        model, _ = build_model(
            self.hf_config,
            comm,
            dtype=DTYPES[cfg.train.dtype],
            overrides=moe_overrides(cfg.moe),
            settings=cfg,
            materialize=not cfg.dist.fsdp,
        )
        return model

    def init_weights(self, model: nn.Module, comm: Comm, fresh: bool) -> None:
        """Storage for a deferred (FSDP) model, then the checkpoint's weights, each rank reading its
        shards (a resumed run takes its weights from the training checkpoint instead)."""
        if self.cfg.dist.fsdp:
            materialize_model(model, comm.device)
        if fresh:
            self.load_stats = load_weights(model, self.src)


class Upcycle(HFTask):
    """A dense BERT checkpoint whose every n-th FFN becomes an MoE of its copies, as a masked LM."""

    name = "upcycle"
    default_lr = 3e-4  # new routers and a fresh MLM transform over a pretrained backbone (docs/upcycle.md)
    save_at_end = True
    weights_required = False  # transformers reads the dense weights (safetensors checked when present)

    def read_config(self, path: Path) -> Any:
        return read_bert_config(path)

    def batches(self, tokens: TokenData) -> MaskedData:
        return MaskedData(tokens, mask_spec(self.src, self.hf_config.vocab_size, self.cfg.upcycle.mask_prob))

    def build(self, cfg: Config, comm: Comm, fresh: bool) -> nn.Module:
        # NOTE: the experts are made from the dense weights, so they are read even when a checkpoint follows
        model, _ = upcycle_bert(self.src, comm, cfg, dtype=DTYPES[cfg.train.dtype])
        return model

    def after_training(self, trainer: Any) -> None:
        """`upcycle.capture`: the MoE layers' FFN inputs on the batch the next step would train on."""
        path = self.cfg.upcycle.capture
        if not path:
            return
        tc = self.cfg.train
        x, _ = trainer.data.train_batch(
            tc.steps, trainer.comm.rank, tc.batch_size, self.cfg.model.seq_len, tc.seed, trainer.comm.device
        )
        meta = {"hf": str(self.src), "task": self.name, "steps": tc.steps, "config": self.cfg.to_dict()}
        capture_ffn_inputs(trainer.model, trainer.comm, x, path, meta)
        trainer.log(f"captured the FFN inputs of {len(moe_blocks(trainer.model))} MoE layers in {path}")


def task_for(path: str | Path) -> HFTask:
    """Upcycling for a dense BERT checkpoint, fine-tuning for anything else (an MoE family or an error)."""
    src = checkpoint_dir(path)
    return Upcycle(src) if model_type_of(src) == "bert" else FineTune(src)


__all__ = ["FineTune", "HFTask", "Upcycle", "config_digest", "moe_overrides", "task_for"]
