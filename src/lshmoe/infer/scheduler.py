"""Lina's two-phase scheduling of every MoE layer of a forward pass, and the per-layer records.

Phase 1 (before the layer's block runs, outside the layer's latency): each rank estimates the
popularity of the layer's experts from its tokens' paths (`profile.path_distribution`), as a sum over
its tokens in fixed point. Integers make the global sum exact and independent of the reduction order,
so every rank gets identical numbers and plans the identical placement without a broadcast.

Phase 2 (blocking, inside `plan` of the layer's dispatcher, after the real gate): one exact sum over
the ranks of [estimate sum_E, tokens, actual rows_E] (`sum_over_ranks`) gives every rank the global
estimate and the actual load. Each
rank plans from the estimate and compares its top-k experts (k = 2) with the actual ones; when they
differ it re-plans from the actual counts. (In the paper phase 1's plan is acted on before the gate,
to move expert weights early; here every rank already holds every expert, so the estimate's
reduction rides with phase 2's and the layer pays one small collective, not two.) Both phases run on
every rank for every layer, whatever the data, so the collective path is the same everywhere.

`placement="uniform"` skips both phases: expert e on rank e // (E / W), no replicas, no extra
collectives (standard expert parallelism, the baseline).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lshmoe.config import PLACEMENTS
from lshmoe.distributed.comm import Comm
from lshmoe.infer.dispatch import PlacementPolicy
from lshmoe.infer.placement import Placement, plan_placement, uniform_placement
from lshmoe.infer.profile import PathProfile, path_distribution, top_experts, top_match

FIXED_POINT = float(2**20)  # estimate sums travel as integers in units of 2**-20 of a token


@dataclass(kw_only=True, slots=True)
class LayerRecord:
    """What one MoE layer did on this rank in one batch (layer-wide fields are identical on all ranks)."""

    seconds: float = 0.0  # wall time of the layer on this rank (begin to finish)
    rows: int = 0  # rows this rank's experts computed
    matched: bool | None = None  # phase 2: estimate's top-k == actual top-k (None: uniform placement)
    replanned: bool = False  # phase 2 re-planned from the actual counts
    estimate_top: tuple[int, ...] = ()
    actual_top: tuple[int, ...] = ()
    placement: Placement | None = None  # the placement the layer dispatched with
    compute_s: float = 0.0  # CPU time of this rank's expert computation (what a dedicated device would spend)
    estimate_s: float = 0.0  # this rank's phase-1 time outside the layer (path lookup)


@dataclass(kw_only=True)
class BatchState:
    """Paths and records of the forward pass in progress."""

    tokens: int = 0  # this rank's tokens in the batch
    top1: list[torch.Tensor] = field(default_factory=list)  # per finished MoE layer: this rank's top-1 ids [T]
    routes: list[torch.Tensor] = field(default_factory=list)  # per finished MoE layer: routed expert ids [T, K]
    estimates: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> [fixed-point sum_E, tokens]
    records: dict[int, LayerRecord] = field(default_factory=dict)


class TwoPhaseScheduler:
    """Placement of every MoE layer for the current forward pass (one instance per model)."""

    def __init__(
        self,
        comm: Comm,
        num_experts: int,
        num_layers: int,
        *,
        placement: str = "popularity",
        profile: PathProfile | None = None,
        estimate_top_k: int = 2,
        match_k: int = 2,
        ordered_match: bool = False,
    ):
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r}; choose one of {', '.join(PLACEMENTS)}")
        self.comm, self.group = comm, comm.group("world")
        self.num_experts, self.num_layers = num_experts, num_layers
        self.mode, self.profile = placement, profile
        self.estimate_top_k, self.match_k, self.ordered_match = estimate_top_k, match_k, ordered_match
        self.uniform = uniform_placement(num_experts, self.group.size)
        self.batch = BatchState()

    def set_mode(self, placement: str) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement={placement!r}; choose one of {', '.join(PLACEMENTS)}")
        self.mode = placement

    def begin_batch(self, tokens: int) -> None:
        """Forget the previous forward pass; `tokens` is this rank's token count in the next one."""
        if self.mode == "popularity" and self.profile is None:
            raise RuntimeError("popularity placement needs a path profile (run the engine's profile() first)")
        self.batch = BatchState(tokens=tokens)

    def record(self, index: int) -> LayerRecord:
        return self.batch.records.setdefault(index, LayerRecord())

    # ------------------------------------------------------------------------------------ phase 1

    def start_estimate(self, index: int) -> None:
        """Before MoE layer `index`'s block: this rank's estimate from the paths so far."""
        if self.mode != "popularity":
            return
        t0 = time.perf_counter()
        if index:
            history_TH = torch.stack(self.batch.top1[:index], 1)
        else:  # layer 0: every path is empty
            history_TH = torch.zeros(self.batch.tokens, 0, dtype=torch.int64)
        dist_TE = path_distribution(self.profile, index, history_TH, self.estimate_top_k)
        self.batch.estimates[index] = torch.cat(
            [torch.round(dist_TE.sum(0) * FIXED_POINT), torch.tensor([float(dist_TE.shape[0])], dtype=torch.float64)]
        ).to(torch.int64)
        self.record(index).estimate_s = time.perf_counter() - t0

    # ------------------------------------------------------------------------------------ phase 2

    def policy(self, index: int) -> PlacementPolicy:
        """The placement policy of layer `index`'s dispatcher: called by its plan() with this rank's counts."""
        return lambda counts_E: self.place(index, counts_E)

    def place(self, index: int, counts_E: torch.Tensor) -> Placement:
        rec = self.record(index)
        if self.mode == "uniform":
            rec.placement = self.uniform
            return rec.placement
        E = self.num_experts
        if index not in self.batch.estimates:
            raise RuntimeError(f"MoE layer {index}: phase 1 did not run (start_estimate is called before the block)")
        both = torch.cat([self.batch.estimates.pop(index), counts_E.cpu().to(torch.int64)])
        both = self.sum_over_ranks(both, f"lina{index}.popularity")
        est_E = both[:E].to(torch.float64) / FIXED_POINT / max(1, int(both[E]))
        actual_E = both[E + 1 :]
        plan = plan_placement(est_E, self.group.size)
        rec.estimate_top = top_experts(est_E, self.match_k)
        rec.actual_top = top_experts(actual_E, self.match_k)
        rec.matched = top_match(est_E, actual_E, self.match_k, self.ordered_match)
        rec.replanned = not rec.matched
        if rec.replanned:
            plan = plan_placement(actual_E, self.group.size)
        rec.placement = plan
        return plan

    def sum_over_ranks(self, x_V: torch.Tensor, tag: str) -> torch.Tensor:
        """Sum of a small int64 vector over the ranks, as one all-to-all round: every rank sends its
        vector to every rank and adds what it receives. For a few dozen integers this is latency-bound,
        and one round beats a ring all-reduce's 2(W-1) steps; integer sums are exact in any order."""
        W = self.group.size
        sent_WV = x_V.to(self.comm.device)[None, :].expand(W, -1).contiguous()
        return self.comm.all_to_all_single(sent_WV, None, None, self.group, tag).cpu().sum(0)

    # ------------------------------------------------------------------------------------ after the gate

    def routed(self, index: int, ids_TK: torch.Tensor, rows: int, seconds: float, compute_s: float) -> None:
        """After MoE layer `index`: its tokens' routed experts, best first (top-1: the next layers'
        paths), rows computed, times."""
        if index == len(self.batch.top1):
            ids_TK = ids_TK.detach().to(torch.int64).cpu()
            self.batch.top1.append(ids_TK[:, 0])
            self.batch.routes.append(ids_TK)
        rec = self.record(index)
        rec.rows, rec.seconds, rec.compute_s = rows, seconds, compute_s
