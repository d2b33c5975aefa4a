"""The dispatcher seam (docs/design.md): every byte an MoE layer sends to other ranks.

Shapes: W expert-parallel ranks, M payload rows on the source rank (grouped by global expert, the
order `sort_by_expert` leaves them in), R rows received by this rank for its local experts.

A dispatcher implements five stages over one frozen `DispatchMeta`:
1. `plan(counts_E) -> meta`: exchange row counts (tag `moe<i>.counts`), decide every split.
2. `dispatch(payload_MD, meta) -> received_RD`: rows to the ranks of their experts, regrouped
   expert-major for the grouped matmul (`meta.local_counts` rows per local expert).
3. `run_experts(experts, received_RD, meta) -> out_RD`: the local expert computation. Usually
   `experts(received_RD, meta.local_counts)`; a dispatcher may shape it (Lina's replica dispatcher
   runs one matmul per source) or fuse it with the exchanges (micro-op pipelining: then `out_RD` is
   already combined and `combine` returns it).
4. `combine(out_RD, meta) -> out_MD`: the outputs back, in payload order.
5. `dispatch_start`/`dispatch_wait` and `combine_start`/`combine_wait`: the same exchanges split into
   an issue and a wait, so a caller can overlap them with its own dense work (ScMoE, shared experts).
   A dispatcher without asynchronous exchanges completes them in `*_start`.

Rules every implementation keeps:
- no communication outside these methods, and every rank takes the same collective path whatever
  its load (a rank that sends or receives nothing joins every exchange with empty splits);
- the exchanges are differentiable: their backward is the reverse exchange, recorded by the ledger;
- `meta` is frozen and passed from plan to combine; nothing about a call is stored on the dispatcher.

The layer never asks which dispatcher it has. A new one is one file plus one line in `build.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lshmoe.distributed.async_autograd import AsyncAllToAll


@dataclass(frozen=True, slots=True)
class DispatchMeta:
    """What every dispatcher's combine needs from its plan (subclasses add their own fields)."""

    in_splits: list[int]  # rows this rank sends to each rank of the group
    out_splits: list[int]  # rows this rank receives from each rank of the group
    local_counts: list[int]  # rows per local expert after regrouping (expert-major)


@dataclass(frozen=True, slots=True)
class Inflight:
    """An exchange issued but not waited for: its handle (None when already complete) and the
    autograd token (the result itself when complete)."""

    handle: AsyncAllToAll | None
    token: torch.Tensor


@runtime_checkable
class Dispatcher(Protocol):
    """See the module docstring for the contract."""

    def plan(self, counts_E: torch.Tensor) -> DispatchMeta: ...

    def dispatch(self, payload_MD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor: ...

    def run_experts(self, experts: nn.Module, received_RD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor: ...

    def combine(self, out_RD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor: ...

    def dispatch_start(self, payload_MD: torch.Tensor, meta: DispatchMeta) -> Inflight: ...

    def dispatch_wait(self, inflight: Inflight, meta: DispatchMeta) -> torch.Tensor: ...

    def combine_start(self, out_RD: torch.Tensor, meta: DispatchMeta) -> Inflight: ...

    def combine_wait(self, inflight: Inflight, meta: DispatchMeta) -> torch.Tensor: ...


class SyncDispatcherBase:
    """Defaults for a dispatcher whose exchanges are synchronous: `*_start` completes the exchange,
    `*_wait` hands back its result; the experts run once on the expert-major rows."""

    def run_experts(self, experts: nn.Module, received_RD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        return experts(received_RD, meta.local_counts)

    def dispatch_start(self, payload_MD: torch.Tensor, meta: DispatchMeta) -> Inflight:
        return Inflight(None, self.dispatch(payload_MD, meta))  # type: ignore[attr-defined]

    def dispatch_wait(self, inflight: Inflight, meta: DispatchMeta) -> torch.Tensor:
        return inflight.token

    def combine_start(self, out_RD: torch.Tensor, meta: DispatchMeta) -> Inflight:
        return Inflight(None, self.combine(out_RD, meta))  # type: ignore[attr-defined]

    def combine_wait(self, inflight: Inflight, meta: DispatchMeta) -> torch.Tensor:
        return inflight.token
