"""Validation loss, agreed by every rank, and the switch that evaluates a model with exact experts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lshmoe.config import Config
from lshmoe.distributed.comm import Comm

CrossEntropy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs, targets) -> mean CE


@torch.no_grad()
def validation_loss(model: nn.Module, ce: CrossEntropy, data, cfg: Config, comm: Comm) -> float:
    """Mean cross-entropy over `train.eval_batches` validation batches per rank, summed over the world
    in float64 (phase `eval`), so every rank returns the same number. The model is in eval mode meanwhile."""
    tc = cfg.train
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=comm.device)
    with comm.ledger.in_phase("eval"):
        for i in range(tc.eval_batches):
            x, y = data.val_batch(
                i, comm.rank, comm.world_size, tc.batch_size, cfg.model.seq_len, comm.device, tc.eval_batches
            )
            total += ce(x, y).double()
        comm.all_reduce(total, comm.group("world"), "eval.loss")
    model.train()
    return float(total) / (tc.eval_batches * comm.world_size)


@contextlib.contextmanager
def exact_experts(layers: list[nn.Module]) -> Iterator[None]:
    """Inside the block every MoE layer sends its routed rows exactly (its compressor bypassed), so a
    compressed model is scored as the model a user deploys; peer systems' layers are left as they are."""
    changed = [layer for layer in layers if hasattr(layer, "exact") and not layer.exact]
    for layer in changed:
        layer.exact = True
    try:
        yield
    finally:
        for layer in changed:
            layer.exact = False
