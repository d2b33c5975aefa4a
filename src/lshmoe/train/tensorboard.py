"""TensorBoard event files of a run (rank 0, `train.tensorboard`), with tags grouped as a reader looks
for them:

    train/...            loss, ce_loss, aux_loss, lr, grad_norm, tokens_per_s, step_time_s, skipped_steps
    comm/...             all-to-all and all-reduce bytes, times and shares of the step
    moe/...              rows routed and sent, the compression rate, dropped tokens
    mem/...              per-rank memory (parameters, gradients, optimizer state, peak RSS)
    moe/layer_<i>/...    each MoE layer's own values: its compression rate, compressor stats, the
                         expert load (a histogram, its max/mean and coefficient of variation); the
                         `auto` compressor's choice as text, by name, whenever it changes
    eval/...             validation losses (exact experts, and as trained when the model compresses)

The same records go to metrics.jsonl; this is a view of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COMM_KEYS = {
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
    "comm_share",
    "a2a_share",
}
MOE_KEYS = {"rows_routed", "rows_sent", "compression_rate", "dropped_tokens"}
SKIP = {"kind", "step", "wall_time"}


def group_of(key: str) -> str:
    if key in COMM_KEYS:
        return "comm"
    if key in MOE_KEYS:
        return "moe"
    if key.startswith("mem_") or key.endswith("rss_bytes"):
        return "mem"
    return "train"


def scalars(rec: dict[str, Any]) -> dict[str, float]:
    """Tag -> value of one metrics record (`train` or `eval`), numbers only."""
    out: dict[str, float] = {}
    section = "eval" if rec.get("kind") == "eval" else None
    for k, v in rec.items():
        if k in SKIP or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        out[f"{section or group_of(k)}/{k}"] = float(v)
    for layer, stats in (rec.get("layers") or {}).items():
        for k, v in stats.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"moe/layer_{layer.removeprefix('moe')}/{k}"] = float(v)
    for name in ("load_max_over_mean", "load_cv"):
        for layer, v in (rec.get(name) or {}).items():
            out[f"moe/layer_{layer.removeprefix('moe')}/{name}"] = float(v)
    return out


class TensorBoard:
    """Writes the loop's records as grouped scalars, per-layer expert-load histograms and text."""

    def __init__(self, path: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(str(path))
        self._choices: dict[str, str] = {}

    def write(self, rec: dict[str, Any]) -> None:
        step = int(rec["step"])
        for tag, v in scalars(rec).items():
            self.writer.add_scalar(tag, v, step)
        for layer, load in (rec.get("expert_load") or {}).items():
            if load:
                import torch

                self.writer.add_histogram(
                    f"moe/layer_{layer.removeprefix('moe')}/expert_load", torch.tensor(load), step
                )
        for layer, stats in (rec.get("layers") or {}).items():
            name = stats.get("auto_choice_name")
            if isinstance(name, str) and self._choices.get(layer) != name:
                self._choices[layer] = name
                self.writer.add_text(f"moe/layer_{layer.removeprefix('moe')}/auto_choice", name, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


__all__ = ["TensorBoard", "scalars"]
