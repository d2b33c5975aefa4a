"""DeepSpeed's MoE layer behind lshmoe's MoE-layer interface: the peer baseline for benchmarks.

`DeepSpeedMoE(cfg, d_model, comm, layer_id)` wraps `deepspeed.moe.layer.MoE` (GeLU FFN experts,
same E, K, capacity factor, EP size = the `ep` group size) and returns an `MoEOutput`, so the same
GPT-MoE and trainer run with either layer. DeepSpeed calls torch.distributed itself, so its
all-to-alls are not in lshmoe's ledger: compare its throughput, not its ledger bytes.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from lshmoe.config import MoEConfig
from lshmoe.distributed.comm import Comm
from lshmoe.moe.layer import MoEOutput
from lshmoe.moe.param_kinds import ParamKind, mark


def have_deepspeed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def init_deepspeed() -> None:
    """DeepSpeed on CPU/gloo, reusing the existing process group (or a one-rank one)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not dist.is_initialized():
        store = tempfile.mktemp(prefix="lshmoe-ds-")
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=0, world_size=1, timeout=timedelta(seconds=120)
        )
    deepspeed.init_distributed(dist_backend="gloo")


class DeepSpeedMoE(nn.Module):
    def __init__(self, cfg: MoEConfig, d_model: int, comm: Comm, layer_id: int, **_: object):
        super().__init__()
        init_deepspeed()
        from deepspeed.moe.layer import MoE

        self.cfg, self.layer_id, self.d_model = cfg, layer_id, d_model
        expert = nn.Sequential(nn.Linear(d_model, cfg.d_expert), nn.GELU(), nn.Linear(cfg.d_expert, d_model))
        cf = cfg.capacity_factor or 1.0
        self.moe = MoE(
            hidden_size=d_model,
            expert=expert,
            num_experts=cfg.num_experts,
            ep_size=comm.group("ep").size,
            k=cfg.top_k,
            capacity_factor=cf,
            eval_capacity_factor=cf,
            min_capacity=4,
            drop_tokens=cfg.capacity_factor is not None,
        )
        self.moe.set_deepspeed_parallelism()
        for p in self.moe.parameters():  # DeepSpeed marks its expert weights allreduce=False
            if not getattr(p, "allreduce", True):
                mark(p, ParamKind.EXPERT)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        shape = x.shape
        x_TD = x.reshape(-1, self.d_model)
        T = x_TD.shape[0]
        y, l_aux, exp_counts = self.moe(x_TD)
        E, K = self.cfg.num_experts, self.cfg.top_k
        cap = max(4, math.ceil(K * T / E * (self.cfg.capacity_factor or 1.0)))
        return MoEOutput(
            y_TD=y.reshape(shape),
            aux={"load_balance": l_aux, "z_loss": l_aux * 0},
            tokens_per_expert_E=torch.as_tensor(exp_counts).reshape(-1)[:E].long(),
            dropped=torch.tensor(0),
            rows_routed=T * K,
            rows_sent=E * cap,
        )
