"""Per-batch inference metrics (agreed by all ranks) and their percentiles over batches.

Latencies are wall times; a layer's latency is the slowest rank's (begin to finish of the layer), a
batch's the slowest rank's forward pass. Load is the rows each rank's experts computed; max/mean
over ranks is 1 for a perfect balance and W when one rank computes everything. Expert compute is the
CPU time of the busiest rank's expert matmuls: the layer's critical-path compute on devices that do
not share cores (on an oversubscribed CPU the wall time of a balanced layer is not shorter, since
ranks that wait for a straggler give their core to it). `balanced_p95_ms` bounds what any placement
can gain: the p95 of each layer call's latency with the busiest rank's expert compute replaced by
the mean rank's (perfect balance, no placement cost, dedicated cores).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(kw_only=True)
class BatchMetrics:
    placement: str
    layer_s: list[float]  # per MoE layer: wall time, max over ranks
    rows_LW: list[list[int]]  # per MoE layer: rows computed by each rank
    compute_s: list[float]  # per MoE layer: CPU time of the expert computation, max over ranks
    compute_mean_s: list[float]  # per MoE layer: the same, mean over ranks
    batch_s: float  # forward pass wall time, max over ranks
    estimate_s: float  # phase-1 time outside the layers (summed over layers), max over ranks
    ce_loss: float  # mean over ranks
    matched: list[bool | None]  # per layer: estimate's top-k == actual (None for uniform placement)
    replanned: list[bool]  # per layer: phase 2 re-planned
    replicas_LE: list[list[int]]  # per layer: replicas of each expert

    def load_max_over_mean(self) -> list[float]:
        out = []
        for rows in self.rows_LW:
            mean = sum(rows) / len(rows)
            out.append(max(rows) / mean if mean > 0 else 1.0)
        return out


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarise(batches: list[BatchMetrics]) -> dict:
    """p50/p95 of MoE-layer latency (every layer of every batch) and of batch latency, mean load
    max/mean, estimation accuracy and re-plan rate (over layers x batches), and per-layer values."""
    if not batches:
        return {}
    L = len(batches[0].layer_s)
    layer = [s for b in batches for s in b.layer_s]
    loads = [v for b in batches for v in b.load_max_over_mean()]
    judged = [m for b in batches for m in b.matched if m is not None]
    per_layer = []
    for i in range(L):
        lm = [b.matched[i] for b in batches if b.matched[i] is not None]
        per_layer.append(
            {
                "layer": i,
                "p50_ms": 1e3 * percentile([b.layer_s[i] for b in batches], 50),
                "p95_ms": 1e3 * percentile([b.layer_s[i] for b in batches], 95),
                "compute_p95_ms": 1e3 * percentile([b.compute_s[i] for b in batches], 95),
                "load_max_mean": statistics.mean(b.load_max_over_mean()[i] for b in batches),
                "accuracy": sum(lm) / len(lm) if lm else None,
                "replan_rate": statistics.mean(float(b.replanned[i]) for b in batches),
                "max_replicas": max(max(b.replicas_LE[i]) for b in batches),
            }
        )
    return {
        "placement": batches[0].placement,
        "batches": len(batches),
        "layer_p50_ms": 1e3 * percentile(layer, 50),
        "layer_p95_ms": 1e3 * percentile(layer, 95),
        "balanced_p95_ms": 1e3
        * percentile(
            [t - c + m for b in batches for t, c, m in zip(b.layer_s, b.compute_s, b.compute_mean_s, strict=True)], 95
        ),
        "compute_share": statistics.median(
            c / t for b in batches for t, c in zip(b.layer_s, b.compute_s, strict=True) if t > 0
        ),
        "compute_p50_ms": 1e3 * percentile([s for b in batches for s in b.compute_s], 50),
        "compute_p95_ms": 1e3 * percentile([s for b in batches for s in b.compute_s], 95),
        "batch_p50_ms": 1e3 * percentile([b.batch_s for b in batches], 50),
        "batch_p95_ms": 1e3 * percentile([b.batch_s for b in batches], 95),
        "estimate_ms": 1e3 * statistics.mean(b.estimate_s for b in batches),
        "load_max_mean": statistics.mean(loads),
        "load_max_mean_p95": percentile(loads, 95),
        "accuracy": sum(judged) / len(judged) if judged else None,
        "replan_rate": statistics.mean(float(r) for b in batches for r in b.replanned),
        "ce_loss": statistics.mean(b.ce_loss for b in batches),
        "per_layer": per_layer,
    }
