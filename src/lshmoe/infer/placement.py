"""Expert placement for one MoE layer: which devices serve each expert, and how its rows are split.

Lina's planner (§5.2), for N devices and a popularity p(e) (normalised here to sum to 1; any
non-negative vector is accepted, e.g. the actual row counts; all zeros is treated as uniform):

1. n_e = N * p(e) is expert e's load in units of one device's fair share (1/N of the layer's rows).
2. Hot experts (n_e >= 1) are replicated on r_e = max(1, floor(n_e + 0.5)) devices (round half up).
   If the replicas exceed N (possible only through rounding up), the expert whose per-replica load
   n_e / (r_e - 1) after losing one replica is smallest loses one (ties: the lower expert id), until
   they fit. Hot experts, in order of n_e descending (ties: lower id), take consecutive device ranks
   from 0, each on devices of its own; each of its devices carries n_e / r_e.
3. Cold experts (n_e < 1), in order of p descending (ties: lower id), are packed first-fit-decreasing:
   each goes to the lowest-ranked device whose load plus n_e stays within 1 (one fair share; devices
   of hot experts with spare room included); when none has room, to the least-loaded device (ties:
   the lower rank). An expert with zero popularity is placed like any other, so every expert has at
   least one device.

Replica split (`split_sizes`, `send_table`): a source rank with c rows for an expert of m replicas
cuts them into m contiguous near-equal pieces in replica order (ascending rank). Cuts fall on
multiples of `align` rows (default 16): the c // align whole units are shared out as evenly as
possible (the first pieces one unit more), and the c % align leftover rows end the last piece.
Why aligned: a CPU BLAS computes a matmul's rows in tiles (4 rows for MKL's AVX-512 float64 kernel)
and the leftover tail rows with another kernel, so a row's result depends on its position modulo the
tile height. A piece that starts on a tile boundary of the source's block, computed on its own,
gives every row exactly the arithmetic of the unsplit block; with align=1 the split is the plain
near-equal one (first c mod m pieces one row longer) and results may differ in the last bits.

Every function here is pure and deterministic, so ranks that plan from identical numbers agree
without exchanging the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CAPACITY_EPS = 1e-9  # slack in the first-fit capacity test (loads are sums of floats)
SPLIT_ALIGN = 16  # replica pieces start on multiples of this many rows (a multiple of common BLAS tile heights)


@dataclass(frozen=True, slots=True)
class Placement:
    """Expert -> the device ranks serving it (ascending), and each device's planned share of the rows."""

    replicas: tuple[tuple[int, ...], ...]
    load_W: tuple[float, ...]  # planned fraction of the layer's rows per device (sums to 1)

    @property
    def num_experts(self) -> int:
        return len(self.replicas)

    @property
    def num_devices(self) -> int:
        return len(self.load_W)

    def replica_counts(self) -> list[int]:
        return [len(r) for r in self.replicas]

    def experts_on(self, device: int) -> list[int]:
        return [e for e, devs in enumerate(self.replicas) if device in devs]


def uniform_placement(num_experts: int, num_devices: int) -> Placement:
    """Standard expert parallelism: expert e on device e // (E / W), no replicas."""
    if num_experts % num_devices:
        raise ValueError(f"uniform placement needs the {num_devices} devices to divide the {num_experts} experts")
    per = num_experts // num_devices
    return Placement(
        replicas=tuple((e // per,) for e in range(num_experts)),
        load_W=tuple(1.0 / num_devices for _ in range(num_devices)),
    )


def _normalised(popularity_E: torch.Tensor | list[float]) -> list[float]:
    p = [float(v) for v in torch.as_tensor(popularity_E, dtype=torch.float64).reshape(-1)]
    if any(v < 0 or not math.isfinite(v) for v in p):
        raise ValueError(f"popularity must be finite and non-negative, got {p}")
    total = sum(p)
    return [v / total for v in p] if total > 0 else [1.0 / len(p)] * len(p)


def replica_counts(popularity_E: torch.Tensor | list[float], num_devices: int) -> dict[int, int]:
    """Replicas of every hot expert (n_e >= 1), after the fit-to-N rule of step 2."""
    p = _normalised(popularity_E)
    n = [num_devices * v for v in p]
    reps = {e: max(1, math.floor(n[e] + 0.5)) for e in range(len(p)) if n[e] >= 1.0}
    while sum(reps.values()) > num_devices:
        e = min((e for e, r in reps.items() if r > 1), key=lambda e: (n[e] / (reps[e] - 1), e))
        reps[e] -= 1
    return reps


def plan_placement(popularity_E: torch.Tensor | list[float], num_devices: int) -> Placement:
    """Lina's placement for one layer (see the module docstring for the rules and tie-breaks)."""
    if num_devices < 1:
        raise ValueError("num_devices must be >= 1")
    p = _normalised(popularity_E)
    E, N = len(p), num_devices
    share = 1.0 / N  # one device's fair share, the first-fit capacity
    reps = replica_counts(p, N)
    devices: list[list[int]] = [[] for _ in range(E)]
    load = [0.0] * N
    cursor = 0
    for e in sorted(reps, key=lambda e: (-p[e], e)):
        for d in range(cursor, cursor + reps[e]):
            devices[e].append(d)
            load[d] += p[e] / reps[e]
        cursor += reps[e]
    for e in sorted((e for e in range(E) if e not in reps), key=lambda e: (-p[e], e)):
        fit = next((d for d in range(N) if load[d] + p[e] <= share + CAPACITY_EPS), None)
        d = fit if fit is not None else min(range(N), key=lambda d: (load[d], d))
        devices[e].append(d)
        load[d] += p[e]
    return Placement(replicas=tuple(tuple(sorted(ds)) for ds in devices), load_W=tuple(load))


def split_sizes(rows: int, parts: int, align: int = SPLIT_ALIGN) -> list[int]:
    """`rows` cut into `parts` contiguous near-equal pieces whose cuts fall on multiples of `align`:
    whole units shared out evenly (the first pieces one unit more), the leftover rows at the end."""
    units, tail = divmod(rows, align)
    base, extra = divmod(units, parts)
    sizes = [(base + (j < extra)) * align for j in range(parts)]
    sizes[-1] += tail
    return sizes


def send_table(counts_E: torch.Tensor | list[int], placement: Placement, align: int = SPLIT_ALIGN) -> torch.Tensor:
    """Rows a source with `counts_E` rows per expert sends to each device for each expert: int64 [W, E]."""
    counts = [int(c) for c in torch.as_tensor(counts_E).reshape(-1)]
    if len(counts) != placement.num_experts:
        raise ValueError(f"{len(counts)} expert counts for a placement of {placement.num_experts} experts")
    table = torch.zeros(placement.num_devices, placement.num_experts, dtype=torch.int64)
    for e, devs in enumerate(placement.replicas):
        for d, n in zip(devs, split_sizes(counts[e], len(devs), align), strict=True):
            table[d, e] = n
    return table


def device_loads(counts_SE: torch.Tensor, placement: Placement, align: int = SPLIT_ALIGN) -> torch.Tensor:
    """Rows each device computes when sources with `counts_SE` rows per expert (one row per source,
    or a single [E] source) split them over `placement`'s replicas: int64 [W]."""
    counts_SE = torch.as_tensor(counts_SE).reshape(-1, placement.num_experts)
    return sum(
        (send_table(c, placement, align).sum(1) for c in counts_SE),
        start=torch.zeros(placement.num_devices, dtype=torch.int64),
    )
