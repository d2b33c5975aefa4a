"""Metrics: a JSONL writer (rank 0), per-interval accumulation across ranks, and the progress bar.

Every `log_every` steps the ranks all-reduce one small vector of interval sums (phase `metrics`,
excluded from the communication share) and rank 0 writes one `train` record with cross-rank values:

- loss, ce_loss, aux_loss: mean over ranks and steps of the interval
- step_time_s, a2a_time_s, allreduce_time_s, comm_time_s: mean over ranks and steps
- comm_share, a2a_share: the corresponding times divided by step_time_s
- tokens_per_s: world tokens per step / step_time_s
- a2a_bytes (and _fwd, _bwd, _meta), allreduce_bytes: bytes on the wire per step, summed over ranks
- rows_routed, rows_sent: MoE rows per step summed over ranks and layers (their ratio is the
  compression rate)
- dropped_tokens: assignments dropped by capacity per step, summed over ranks and layers
- host_syncs: implicit CUDA host synchronisations (.item(), blocking copies, data-dependent shapes)
  per step and rank, from the batch to the optimizer step's end (lshmoe.distributed.syncs; 0 on CPU);
  host_syncs_comm: explicit device synchronizes of the ledger's `sync` timing (0 with `events`)
- expert_load: per MoE layer, rows per expert per step, summed over ranks
- layers: per MoE layer, its own numbers (`MoEOutput.stats`), each reduced as `MoEOutput.reduce`
  declares: rows and bytes summed over ranks, a compressor's seconds and parameters averaged over
  ranks, its probe measurements averaged over the probes of the interval, a state (`auto_choice`) as
  its value at the interval's last step; `compression_rate` =
  rows sent / rows routed
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lshmoe.compress.protocol import Reduce
from lshmoe.distributed.comm import Comm
from lshmoe.distributed.ledger import StepComm

SCALARS = (
    "loss",
    "ce_loss",
    "aux_loss",
    "step_time_s",
    "a2a_bytes",
    "a2a_bytes_fwd",
    "a2a_bytes_bwd",
    "a2a_meta_bytes",
    "allreduce_bytes",
    "inter_node_bytes",
    "intra_node_bytes",
    "a2a_time_s",
    "a2a_exposed_s",
    "allreduce_time_s",
    "comm_time_s",
    "rows_routed",
    "rows_sent",
    "dropped_tokens",
    "grad_norm",
    "host_syncs",
    "host_syncs_comm",
)
# Per-step values taken from the ledger's StepComm summary.
FROM_LEDGER = (
    "a2a_bytes",
    "a2a_bytes_fwd",
    "a2a_bytes_bwd",
    "a2a_meta_bytes",
    "allreduce_bytes",
    "a2a_time_s",
    "a2a_exposed_s",
    "inter_node_bytes",
    "intra_node_bytes",
    "allreduce_time_s",
    "comm_time_s",
)
MEAN_OVER_RANKS = {
    "loss",
    "ce_loss",
    "aux_loss",
    "step_time_s",
    "a2a_time_s",
    "a2a_exposed_s",
    "allreduce_time_s",
    "comm_time_s",
    "grad_norm",
    "host_syncs",
    "host_syncs_comm",
}


class IntervalStats:
    """Sums of per-step values since the last log line, on this rank."""

    def __init__(self, moe_layers: list[int], num_experts: int):
        self.moe_layers, self.num_experts = moe_layers, num_experts
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.sums = dict.fromkeys(SCALARS, 0.0)
        self.load = torch.zeros(len(self.moe_layers), self.num_experts, dtype=torch.float64)
        self.layer_sums: dict[int, dict[str, float]] = {}
        self.layer_reduce: dict[int, dict[str, Reduce]] = {}

    def add(
        self,
        values: dict[str, float],
        comm_step: StepComm,
        load_LE: torch.Tensor,
        layer_stats: dict[int, dict[str, float]] | None = None,
        layer_reduce: dict[int, dict[str, Reduce]] | None = None,
    ) -> None:
        """One step's values; `layer_reduce` says how each per-layer stat reduces (default SUM)."""
        self.steps += 1
        for layer, reduce in (layer_reduce or {}).items():
            self.layer_reduce.setdefault(layer, {}).update(reduce)
        for layer, stats in (layer_stats or {}).items():
            acc = self.layer_sums.setdefault(layer, {})
            how = self.layer_reduce.get(layer, {})
            for k, v in stats.items():
                acc[k] = float(v) if how.get(k) is Reduce.LAST else acc.get(k, 0.0) + float(v)
        merged = {**values, **{k: getattr(comm_step, k) for k in FROM_LEDGER}}
        for k in SCALARS:
            self.sums[k] += float(merged.get(k, 0.0))
        self.load += load_LE.double()

    def add_step(self, values: dict[str, float], comm_step: StepComm, moe: dict[int, Any]) -> dict[str, float]:
        """One training step from its MoE layers' outputs (`MoEOutput` by layer id, in `moe_layers`
        order): `values` plus the rows routed, sent and dropped over the layers, which it returns; the
        expert load and each layer's stats go into the interval too."""
        values = {
            **values,
            "rows_routed": sum(o.rows_routed for o in moe.values()),
            "rows_sent": sum(o.rows_sent for o in moe.values()),
            "dropped_tokens": sum(int(o.dropped) for o in moe.values()),
        }
        load_LE = (
            torch.stack([moe[i].tokens_per_expert_E.cpu() for i in self.moe_layers])
            if moe
            else torch.zeros_like(self.load)
        )
        stats = {i: o.stats for i, o in moe.items()}
        self.add(values, comm_step, load_LE, stats, {i: o.reduce for i, o in moe.items()})
        return values

    def reduce(self, comm: Comm, tokens_per_rank_step: int) -> dict[str, Any]:
        """All-reduce the interval over the world and return the cross-rank record (every rank)."""
        # Every rank has the same layers and stat keys (they follow from the config), so the vectors align.
        layer_keys = [(layer, k) for layer in sorted(self.layer_sums) for k in sorted(self.layer_sums[layer])]
        vec = torch.tensor(
            [self.sums[k] for k in SCALARS]
            + self.load.reshape(-1).tolist()
            + [self.layer_sums[layer][k] for layer, k in layer_keys],
            dtype=torch.float64,
            device=comm.device,
        )
        comm.all_reduce(vec, comm.group("world"), "metrics", phase="metrics")
        vec = vec.cpu()
        W, n = comm.world_size, max(1, self.steps)
        rec: dict[str, Any] = {}
        for i, k in enumerate(SCALARS):
            rec[k] = float(vec[i]) / n / (W if k in MEAN_OVER_RANKS else 1)
        n_load = len(self.moe_layers) * self.num_experts
        load = vec[len(SCALARS) : len(SCALARS) + n_load].view(len(self.moe_layers), self.num_experts) / n
        rec["expert_load"] = {
            f"moe{layer}": [round(v, 2) for v in load[i].tolist()] for i, layer in enumerate(self.moe_layers)
        }
        mean = load.mean(1).clamp_min(1e-12)
        rec["load_max_over_mean"] = {
            f"moe{layer}": float(load[i].max() / mean[i]) for i, layer in enumerate(self.moe_layers)
        }
        rec["load_cv"] = {
            f"moe{layer}": float(load[i].std(unbiased=False) / mean[i]) for i, layer in enumerate(self.moe_layers)
        }
        summed = dict(zip(layer_keys, vec[len(SCALARS) + n_load :].tolist(), strict=True))
        rec["layers"] = _layer_record(summed, self.layer_reduce, steps=n, world=W)
        st = rec["step_time_s"]
        rec["tokens_per_s"] = W * tokens_per_rank_step / st if st > 0 else 0.0
        rec["comm_share"] = rec["comm_time_s"] / st if st > 0 else 0.0
        rec["a2a_share"] = rec["a2a_time_s"] / st if st > 0 else 0.0
        rec["compression_rate"] = rec["rows_sent"] / rec["rows_routed"] if rec["rows_routed"] else 1.0
        self.reset()
        return rec


def _layer_record(
    summed: dict[tuple[int, str], float], reduce: dict[int, dict[str, Reduce]], steps: int, world: int
) -> dict[str, dict[str, float]]:
    """Per-layer interval values from cross-rank sums, each by its declared `Reduce` (SUM when none:
    the layer's own rows and bytes)."""
    out: dict[str, dict[str, float]] = {}
    for layer in sorted({layer for layer, _ in summed}):
        s = {k: v for (lay, k), v in summed.items() if lay == layer}
        how = reduce.get(layer, {})
        probes = sum(v for k, v in s.items() if how.get(k) is Reduce.PROBES)
        rec: dict[str, float] = {}
        for k, v in s.items():
            kind = how.get(k, Reduce.SUM)
            if kind is Reduce.PROBES:
                continue
            if kind is Reduce.PER_PROBE:
                rec[k] = v / probes if probes else float("nan")
            elif kind is Reduce.MEAN:
                rec[k] = v / steps / world
            elif kind is Reduce.LAST:
                rec[k] = v / world
            else:
                rec[k] = v / steps
        if rec.get("rows_routed"):
            rec["compression_rate"] = rec["rows_sent"] / rec["rows_routed"]
            if "rows_local" in rec:
                rec["local_fraction"] = rec["rows_local"] / rec["rows_routed"]
        out[f"moe{layer}"] = rec
    return out


@dataclass(kw_only=True, slots=True)
class MergedMoE:
    """One MoE layer's outputs of a step's micro-batches, as one (what `IntervalStats.add_step` reads)."""

    rows_routed: int
    rows_sent: int
    dropped: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    stats: dict[str, float]
    reduce: dict[str, Reduce]


def merge_micro_batches(outs: list[dict[int, Any]]) -> dict[int, Any]:
    """A step's per-layer MoE outputs from its micro-batches: rows, drops and loads add up; each stat
    by its kind (amounts add, means average, a state keeps its last value)."""
    if len(outs) == 1:
        return outs[0]
    merged = {}
    for i in outs[0]:
        parts = [o[i] for o in outs]
        reduce = {k: v for p in parts for k, v in p.reduce.items()}
        stats: dict[str, float] = {}
        for k in parts[-1].stats:
            values = [p.stats[k] for p in parts if k in p.stats]
            kind = reduce.get(k, Reduce.SUM)
            stats[k] = values[-1] if kind is Reduce.LAST else sum(values) / (len(values) if kind is Reduce.MEAN else 1)
        merged[i] = MergedMoE(
            rows_routed=sum(p.rows_routed for p in parts),
            rows_sent=sum(p.rows_sent for p in parts),
            dropped=sum(p.dropped for p in parts),
            tokens_per_expert_E=sum(p.tokens_per_expert_E for p in parts),
            stats=stats,
            reduce=reduce,
        )
    return merged


class MetricsWriter:
    """Appends one JSON object per line; a no-op on ranks other than 0."""

    def __init__(self, path: Path | None, append: bool = False):
        self.path = path
        self._fh = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class Progress:
    """A tqdm bar on rank 0 (stderr); silent elsewhere or when disabled."""

    def __init__(self, total: int, enabled: bool, desc: str = "train", initial: int = 0):
        self.bar = (
            tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)
            if enabled
            else None
        )

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
