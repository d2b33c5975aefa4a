"""Expert-parallel size 1: every expert is local, nothing crosses ranks."""

from __future__ import annotations

import torch

from lshmoe.moe.dispatch.flat import FlatMeta
from lshmoe.moe.dispatch.protocol import SyncDispatcherBase


class LocalDispatcher(SyncDispatcherBase):
    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def plan(self, counts_E: torch.Tensor) -> FlatMeta:
        n = int(counts_E.sum())
        c = counts_E.cpu().view(1, -1)
        return FlatMeta(
            in_splits=[n],
            out_splits=[n],
            local_counts=counts_E.tolist(),
            regroup_R=None,
            ungroup_R=None,
            send_WG=c,
            recv_WG=c,
        )

    def dispatch(self, payload_MD: torch.Tensor, meta: FlatMeta) -> torch.Tensor:
        return payload_MD

    def combine(self, out_RD: torch.Tensor, meta: FlatMeta) -> torch.Tensor:
        return out_RD
