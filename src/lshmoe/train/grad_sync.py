"""Gradient synchronisation for data-parallel dense weights and expert-parallel experts.

Dense (replicated) parameters: gradients are summed over the world in flat buckets and divided by
the world size W, exactly what DDP computes. Expert parameters: each EP rank already holds the sum
over its EP group of the gradient contributions of every token routed to its experts (the backward
all-to-all brought them); they are summed over the expert-data-parallel group (ranks holding the same
experts, if any) and divided by W, so both kinds equal the gradient of the mean of the per-rank losses.

Every rank issues the same all-reduces in the same order whatever its data: a parameter that got no
gradient contributes zeros instead of being skipped, so no rank can wait on a collective the others
never join. Clipping uses one global norm agreed by every rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lshmoe.distributed.comm import Comm
from lshmoe.moe.param_kinds import is_expert_param, is_node_param

BUCKET_BYTES = 25 * 2**20


def _buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[list[nn.Parameter]]:
    out, cur, size = [], [], 0
    for p in params:
        cur.append(p)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            out.append(cur)
            cur, size = [], 0
    if cur:
        out.append(cur)
    return out


class GradSync:
    """`params` restricts it to those parameters (under FSDP: the ones FSDP leaves alone)."""

    def __init__(
        self,
        model: nn.Module,
        comm: Comm,
        bucket_bytes: int = BUCKET_BYTES,
        params: list[nn.Parameter] | None = None,
    ):
        self.comm = comm
        named = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
        self.dense = [p for p in named if not is_expert_param(p) and not is_node_param(p)]
        self.expert = [p for p in named if is_expert_param(p)]
        self.node = [p for p in named if is_node_param(p)]
        self.dense_buckets = _buckets(self.dense, bucket_bytes)
        self.expert_buckets = _buckets(self.expert, bucket_bytes)
        self.node_buckets = _buckets(self.node, bucket_bytes)

    def _reduce(self, buckets: list[list[nn.Parameter]], group_name: str, tag: str) -> None:
        group = self.comm.group(group_name)
        scale = 1.0 / self.comm.world_size
        for i, bucket in enumerate(buckets):
            for p in bucket:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            if group.size > 1:
                flat = torch.cat([p.grad.reshape(-1) for p in bucket])
                self.comm.all_reduce(flat, group, f"{tag}.{i}")
                offset = 0
                for p in bucket:
                    p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                    offset += p.numel()
            for p in bucket:
                p.grad.mul_(scale)

    def sync(self, dense: bool = True) -> None:
        """Average dense gradients over the world (unless a scheduler already did) and expert gradients
        over their replicas."""
        if dense:
            self._reduce(self.dense_buckets, "world", "grad.dense")
        self._reduce(self.expert_buckets, "edp", "grad.expert")
        self._reduce(self.node_buckets, "node", "grad.node")  # empty unless moe.node_bias

    def global_norm(self) -> torch.Tensor:
        """L2 norm of the whole model's gradient, identical on every rank."""

        def sq(params: list[nn.Parameter]) -> torch.Tensor:
            acc = torch.zeros((), dtype=torch.float64, device=self.comm.device)
            for p in params:
                if p.grad is not None:
                    acc += (
                        torch.linalg.vector_norm(
                            p.grad, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32
                        )
                        .double()
                        .square()
                    )
            return acc

        dense, expert = sq(self.dense), sq(self.expert)
        # Each EP rank holds different experts: their squares add up over the EP group.
        self.comm.all_reduce(expert, self.comm.group("ep"), "grad.norm")
        if self.node:  # one copy per node: the squares of every rank, over the ranks of a node
            node = sq(self.node)
            self.comm.all_reduce(node, self.comm.group("world"), "grad.norm.node")
            expert = expert + node / self.comm.group("node").size
        return (dense + expert).sqrt()

    def clip(self, max_norm: float) -> float:
        """Scale every gradient so the global norm is at most `max_norm`; return the norm before."""
        norm = self.global_norm()
        total = float(norm)
        if max_norm > 0 and math.isfinite(total) and total > max_norm:
            scale = max_norm / (total + 1e-6)
            for p in self.dense + self.expert + self.node:
                if p.grad is not None:
                    p.grad.mul_(scale)
        return total
