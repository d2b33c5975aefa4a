"""Parameter kinds, marked on the tensor when a module creates it (never recognised by name).

- dense: replicated on every rank, gradients averaged over the world (the default);
- expert: sharded over the expert-parallel group, never all-reduced across it;
- node: replicated within a node and reduced over that node's ranks only (LocMoE's per-node bias).

Gradient sync, Lina's scheduler, checkpoints and initialisation read the mark with `kind_of`. The
mark is a plain attribute of the Parameter object; `Module.to()`/`.double()` keep the object, so
the mark survives dtype moves. A move between device types (to or from the meta device) and FSDP's
sharding create new Parameter objects: do those inside `kinds_kept(module)`, which marks the new
parameters as the old ones were, by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import Enum

import torch
from torch import nn

_ATTR = "_lshmoe_kind"


class ParamKind(str, Enum):
    DENSE = "dense"
    EXPERT = "expert"
    NODE = "node"


def mark(p: torch.Tensor, kind: ParamKind) -> torch.Tensor:
    setattr(p, _ATTR, kind)
    return p


def kind_of(p: torch.Tensor) -> ParamKind:
    return getattr(p, _ATTR, ParamKind.DENSE)


@contextlib.contextmanager
def kinds_kept(module: nn.Module) -> Iterator[None]:
    """Re-mark `module`'s parameters after the block, by name (see the module docstring)."""
    kinds = {n: kind_of(p) for n, p in module.named_parameters()}
    yield
    for n, p in module.named_parameters():
        if n in kinds:
            mark(p, kinds[n])


def is_expert_param(p: torch.Tensor) -> bool:
    """Expert weights are sharded over the EP group and never all-reduced across it."""
    return kind_of(p) is ParamKind.EXPERT


def is_node_param(p: torch.Tensor) -> bool:
    """Per-node parameters: replicated within a node, reduced over the node's ranks only."""
    return kind_of(p) is ParamKind.NODE
