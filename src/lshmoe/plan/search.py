"""Every training setting of a model on a cluster, its bytes per rank, whether it fits, and the one to use.

A setting fits when its bytes per rank (plan/memory.py) are within the usable memory of a GPU:

    usable = gpu_mem * (1 - fragmentation) - reserve

`reserve` (default 2 GiB) stands for what no tensor accounts for: the CUDA context and kernels
(about 0.5-1 GiB), NCCL communicators and their buffers, cuBLAS workspaces. `fragmentation`
(default 10%) for the caching allocator's blocks that are free but cannot hold the next request.

The recommendation is the fitting setting with the fewest costly options, each costing points:

    FSDP                        2   all-gathers in every forward and backward, a reduce-scatter per micro-batch
    micro-batches N > 1         log2 N rounded up: every micro-batch pays its own dispatch and combine
                                (and its own all-gathers under FSDP), LSH sees fewer rows per group
    AC experts / blocks         1 / 2: recomputed expert FFNs / also attention
    float32 compute             1   twice the all-to-all payload and activation bytes of bf16
    EP beyond one node          1   the all-to-all leaves the node

ties broken by fewer bytes. Pure bf16 is never recommended (no fp32 master weights: small updates
round away); when only pure bf16 fits, the recommendation says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lshmoe.plan.memory import AC_MODES, DTYPES, Breakdown, Setting, Workload, memory_per_rank
from lshmoe.plan.shape import ModelShape

GiB = 2**30


@dataclass(frozen=True, kw_only=True, slots=True)
class Budget:
    """The memory of one GPU and what of it the tensors may use."""

    gpu_bytes: int
    reserve_bytes: int = 2 * GiB
    fragmentation: float = 0.10

    @property
    def usable(self) -> int:
        return int(self.gpu_bytes * (1.0 - self.fragmentation)) - self.reserve_bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class Cluster:
    nodes: int
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True, kw_only=True, slots=True)
class Choices:
    """Which values of each dimension to enumerate (None: all that apply)."""

    eps: tuple[int, ...] | None = None
    fsdp: tuple[bool, ...] = (False, True)
    dtypes: tuple[str, ...] = DTYPES
    acs: tuple[str, ...] = AC_MODES
    micro_batches: tuple[int, ...] | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Row:
    breakdown: Breakdown
    fits: bool
    cost: int

    @property
    def setting(self) -> Setting:
        return self.breakdown.setting


def ep_sizes(num_experts: int, world: int) -> list[int]:
    """EP sizes lshmoe can run: divisors of the world that divide the experts."""
    return [ep for ep in range(1, world + 1) if world % ep == 0 and num_experts % ep == 0]


def settings(shape: ModelShape, cluster: Cluster, batch_size: int, choices: Choices) -> list[Setting]:
    """The cross product of the dimensions, restricted to what applies."""
    eps = choices.eps or tuple(ep_sizes(shape.num_experts or 1, cluster.world))
    micro = choices.micro_batches or tuple(n for n in range(1, batch_size + 1) if batch_size % n == 0)
    return [
        Setting(world=cluster.world, ep=ep, fsdp=fsdp, dtype=dtype, ac=ac, micro_batches=n)
        for ep in eps
        for fsdp in choices.fsdp
        for dtype in choices.dtypes
        for ac in choices.acs
        for n in micro
        if not (ac == "experts" and not shape.moe_layers)
    ]


def cost(s: Setting, gpus_per_node: int) -> int:
    """Points of the costly options (the module docstring's table)."""
    points = 2 * s.fsdp + math.ceil(math.log2(s.micro_batches)) + AC_MODES.index(s.ac)
    points += (s.dtype == "float32") + (s.ep > gpus_per_node)
    return points


def plan(shape: ModelShape, workload: Workload, cluster: Cluster, budget: Budget, choices: Choices) -> list[Row]:
    """Every setting, fitting ones first (fewest cost points, then fewest bytes), then the rest by bytes."""
    rows = []
    for s in settings(shape, cluster, workload.batch_size, choices):
        b = memory_per_rank(shape, s, workload)
        rows.append(Row(breakdown=b, fits=b.total <= budget.usable, cost=cost(s, cluster.gpus_per_node)))
    return sorted(rows, key=_order)


def _order(r: Row) -> tuple:
    # NOTE: pure bf16 sorts after every fitting setting with fp32 masters, however cheap
    return (not r.fits, r.fits and r.setting.dtype == "bf16-pure", r.cost if r.fits else 0, r.breakdown.total)


def recommend(rows: list[Row]) -> Row | None:
    """The best fitting row with fp32 master weights, or None."""
    return next((r for r in rows if r.fits and r.setting.dtype != "bf16-pure"), None)


def smallest_cluster(
    shape: ModelShape, workload: Workload, cluster: Cluster, budget: Budget, choices: Choices, max_nodes: int = 4096
) -> tuple[Cluster, Row] | None:
    """When nothing fits: the fewest nodes (doubling) on which a recommendable setting fits."""
    nodes = cluster.nodes
    while nodes < max_nodes:
        nodes *= 2
        bigger = Cluster(nodes=nodes, gpus_per_node=cluster.gpus_per_node)
        best = recommend(plan(shape, workload, bigger, budget, Choices(**{**_as_dict(choices), "eps": None})))
        if best is not None:
            return bigger, best
    return None


def _as_dict(choices: Choices) -> dict:
    return {f: getattr(choices, f) for f in Choices.__slots__}


__all__ = ["Budget", "Choices", "Cluster", "GiB", "Row", "cost", "ep_sizes", "plan", "recommend", "settings"]
