"""AdamW with decoupled weight decay on matrices only, a warmup + cosine learning-rate schedule, and
the step every trainer takes: sync, clip, and update only when the global norm is finite."""

from __future__ import annotations

import math

import torch
from torch import nn

from lshmoe.config import SCRATCH_LR, TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on weights with two or more dimensions (matrices, embeddings, expert banks)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=peak_lr(cfg), betas=(cfg.beta1, cfg.beta2), foreach=False)


def peak_lr(cfg: TrainConfig) -> float:
    """`train.lr`; none (the model's own, which the training loop fills in) is the from-scratch rate here."""
    return cfg.lr if cfg.lr is not None else SCRATCH_LR


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr_ratio * lr` at `steps`."""
    lr = peak_lr(cfg)
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = lr * cfg.min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def apply_gradients(opt: torch.optim.Optimizer, sync, model: nn.Module, comm, grad_clip: float, dense: bool) -> float:
    """Reduce the gradients (`sync`: a GradSync; dense ones only when `dense`, else a scheduler did),
    clip them to the global norm, and step when that norm is finite (the same decision on every
    rank, since the norm is global), then move the routers' correction biases. Returns the norm."""
    from lshmoe.moe.router import update_correction_biases

    sync.sync(dense=dense)
    grad_norm = sync.clip(grad_clip)
    if math.isfinite(grad_norm):
        opt.step()
        update_correction_biases(model, comm)
    return grad_norm
