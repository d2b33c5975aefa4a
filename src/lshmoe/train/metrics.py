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
- expert_load: per MoE layer, rows per expert per step, summed over ranks
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lshmoe.dist.comm import Comm
from lshmoe.dist.ledger import StepComm

SCALARS = ("loss", "ce_loss", "aux_loss", "step_time_s", "a2a_bytes", "a2a_bytes_fwd", "a2a_bytes_bwd",
           "a2a_meta_bytes", "allreduce_bytes", "a2a_time_s", "allreduce_time_s", "comm_time_s",
           "rows_routed", "rows_sent", "dropped_tokens", "grad_norm")
MEAN_OVER_RANKS = {"loss", "ce_loss", "aux_loss", "step_time_s", "a2a_time_s", "allreduce_time_s",
                   "comm_time_s", "grad_norm"}


class IntervalStats:
    """Sums of per-step values since the last log line, on this rank."""

    def __init__(self, moe_layers: list[int], num_experts: int):
        self.moe_layers, self.num_experts = moe_layers, num_experts
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.sums = dict.fromkeys(SCALARS, 0.0)
        self.load = torch.zeros(len(self.moe_layers), self.num_experts, dtype=torch.float64)

    def add(self, values: dict[str, float], comm_step: StepComm, load_LE: torch.Tensor) -> None:
        self.steps += 1
        merged = dict(values)
        merged.update(a2a_bytes=comm_step.a2a_bytes, a2a_bytes_fwd=comm_step.a2a_bytes_fwd,
                      a2a_bytes_bwd=comm_step.a2a_bytes_bwd, a2a_meta_bytes=comm_step.a2a_meta_bytes,
                      allreduce_bytes=comm_step.allreduce_bytes, a2a_time_s=comm_step.a2a_time_s,
                      allreduce_time_s=comm_step.allreduce_time_s, comm_time_s=comm_step.comm_time_s)
        for k in SCALARS:
            self.sums[k] += float(merged.get(k, 0.0))
        self.load += load_LE.double()

    def reduce(self, comm: Comm, tokens_per_rank_step: int) -> dict[str, Any]:
        """All-reduce the interval over the world and return the cross-rank record (every rank)."""
        vec = torch.tensor([self.sums[k] for k in SCALARS] + self.load.reshape(-1).tolist(),
                           dtype=torch.float64, device=comm.device)
        comm.all_reduce(vec, comm.group("world"), "metrics", phase="metrics")
        vec = vec.cpu()
        W, n = comm.world_size, max(1, self.steps)
        rec: dict[str, Any] = {}
        for i, k in enumerate(SCALARS):
            rec[k] = float(vec[i]) / n / (W if k in MEAN_OVER_RANKS else 1)
        load = vec[len(SCALARS):].view(len(self.moe_layers), self.num_experts) / n
        rec["expert_load"] = {f"moe{layer}": [round(v, 2) for v in load[i].tolist()]
                              for i, layer in enumerate(self.moe_layers)}
        st = rec["step_time_s"]
        rec["tokens_per_s"] = W * tokens_per_rank_step / st if st > 0 else 0.0
        rec["comm_share"] = rec["comm_time_s"] / st if st > 0 else 0.0
        rec["a2a_share"] = rec["a2a_time_s"] / st if st > 0 else 0.0
        rec["compression_rate"] = rec["rows_sent"] / rec["rows_routed"] if rec["rows_routed"] else 1.0
        self.reset()
        return rec


class MetricsWriter:
    """Appends one JSON object per line; a no-op on ranks other than 0."""

    def __init__(self, path: Path | None):
        self.path = path
        self._fh = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()

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

    def __init__(self, total: int, enabled: bool, desc: str = "train"):
        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True) if enabled else None

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
