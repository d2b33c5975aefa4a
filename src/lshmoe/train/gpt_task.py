"""The GPT-MoE task: lshmoe's own decoder (models/gpt.py) on token data with a BPE trained offline.

`moe_factory` is the seam through which benchmarks put a peer system's MoE layer into the same model;
`data` lets a caller that already holds the token data (a benchmark training several variants) skip
loading it again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lshmoe.config import DTYPES, SCRATCH_LR, Config, validate
from lshmoe.data import TokenData, load_data
from lshmoe.distributed.comm import Comm
from lshmoe.models.gpt import GPTMoE, MoEFactory
from lshmoe.moe.layer import MoELayer
from lshmoe.train.checkpoint import model_signature
from lshmoe.train.task import Log, StepOutput, TaskBase, params_line


class GPTTask(TaskBase):
    name = "gpt"
    default_lr = SCRATCH_LR  # trained from scratch
    save_at_end = False  # a research run saves when asked (--save-every)

    def __init__(self, moe_factory: MoEFactory = MoELayer, data: TokenData | None = None):
        self.moe_factory, self.data = moe_factory, data
        self.cfg: Config | None = None

    def setup(self, cfg: Config, comm: Comm, log: Log) -> TokenData:
        ep_nodes = len({comm.node_of.get(r, 0) for r in comm.group("ep").ranks})
        validate(cfg, comm.world_size, nodes=ep_nodes)
        self.cfg = cfg
        if self.data is None:
            self.data = load_data(cfg.data, log)
        return self.data

    def build(self, cfg: Config, comm: Comm, fresh: bool) -> GPTMoE:
        seed = cfg.train.seed
        model = GPTMoE(cfg.model, cfg.moe, self.data.vocab_size, comm, self.moe_factory, settings=cfg, seed=seed)
        model.to(device=comm.device, dtype=DTYPES[cfg.train.dtype])
        model.reset_parameters(seed)  # cheap, and a checkpoint overwrites it
        return model

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        out = model(x, y)
        return StepOutput(loss=out.loss, ce=out.ce_loss, aux=out.aux_loss, moe=out.moe)

    def moe_layers(self, model: nn.Module) -> list[nn.Module]:
        return model.moe_layers

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def signature(self) -> dict[str, Any]:
        return model_signature(self.cfg, self.data.vocab_size)

    def describe(self, model: nn.Module) -> str:
        moe = self.cfg.moe
        return (
            f"GPT-MoE, {params_line(model)}, {len(model.moe_ids)} MoE layers x {moe.num_experts} experts "
            f"(top-{moe.top_k})"
        )


def train(cfg: Config):
    """Run a GPT-MoE training job in this process (one rank of it under torchrun or the local launcher)."""
    from lshmoe.train.loop import run_job

    return run_job(cfg, GPTTask())


__all__ = ["GPTTask", "train"]
