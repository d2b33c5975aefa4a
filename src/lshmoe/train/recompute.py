"""Activation checkpointing (`train.ac`) that never recomputes a collective or a side effect.

    experts   each MoE layer's expert FFN (`GroupedExperts`): its hidden state, R x F per projection
              (x2 GeLU, x3 SwiGLU), the largest activation of an MoE block, is recomputed in backward
    blocks    also every attention sub-block (lshmoe's and transformers' attention modules) and every
              dense FFN (`*MLP` modules outside the MoE layers); their norms stay outside (a norm's
              output is the region's input, which is kept)

Both regions are pure computation. Everything with a collective or a side effect stays outside and
runs once: the router (its load counters), capacity, permute, the compressor (LSH hashing, its
controller and probe, `auto`'s timing), the dispatcher's count exchange, dispatch and combine, and the
ledger's records. So the ledger sees the same collectives and bytes with and without recomputation,
and gradients are the same (tests/test_scale.py). Dropout inside a region replays its RNG state.

A region is checkpointed by wrapping its module's `forward` on the instance (torch's non-reentrant
`checkpoint`), which keeps parameter names unchanged, so checkpoints are the same with and without AC.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lshmoe.moe.experts import GroupedExperts

MODES = ("none", "experts", "blocks")


def _recompute(module: nn.Module) -> None:
    forward = module.forward

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = run


def is_attention(module: nn.Module) -> bool:
    """lshmoe's CausalSelfAttention and transformers' *Attention modules (the outermost of nested ones)."""
    return type(module).__name__.endswith("Attention")


def is_dense_ffn(module: nn.Module) -> bool:
    """lshmoe's MLP and transformers' *MLP modules (a dense layer's FFN)."""
    return type(module).__name__.endswith("MLP")


def _is_moe(module: nn.Module) -> bool:
    return type(module).__name__ in ("MoELayer", "HFMoEBlock")


def apply(model: nn.Module, mode: str) -> list[nn.Module]:
    """Checkpoint the regions of `mode`; return the modules wrapped."""
    assert mode in MODES, mode
    if mode == "none":
        return []
    regions = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    if mode == "blocks":
        inner: set[int] = set()  # modules inside a region already taken, or inside an MoE layer
        for m in model.modules():
            if id(m) in inner:
                continue
            if _is_moe(m):
                inner |= {id(c) for c in m.modules()}
            elif is_attention(m) or is_dense_ffn(m):
                regions.append(m)
                inner |= {id(c) for c in m.modules()}
    for m in regions:
        _recompute(m)
    return regions


__all__ = ["MODES", "apply", "is_attention", "is_dense_ffn"]
