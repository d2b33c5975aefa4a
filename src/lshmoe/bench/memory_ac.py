"""What activation checkpointing removes, measured with torch's `MemTracker` in one process.

Peak RSS is too coarse on a CPU (the allocator's free lists, the interpreter, gloo's buffers) to see
one MoE block's expert hidden state, so this part tracks tensors instead: for each `--ac` mode the
real training loop's model (`Trainer`: the same recompute wrapping, autocast and task) runs one
forward on one rank (EP 1, so the rows a block's experts receive are exactly its T x K routed rows)
under `MemTracker`, and reads
- the activations kept after the forward (category ACT), for the whole model;
- per MoE block, the activations its forward left behind: ACT after its forward minus before it
  (what it saved for backward, plus its output);
- the step's peak of activations and temporaries (ACT + TEMP) over forward and backward, where a
  recomputed region comes back one at a time.
Against the formula (`lshmoe.plan`): the removed `moe.expert_hidden` per MoE layer, h x c x R x F
(h = 2 GELU, 4 SwiGLU; c the compute bytes; R = T x K rows; F the expert width).
"""

from __future__ import annotations

from typing import Any

from lshmoe.config import from_dict

MODES = ("none", "experts", "blocks")


def _by_category(snap: dict) -> dict[str, int]:
    [dev] = list(snap)
    return {str(k).rsplit(".", 1)[-1]: int(v) for k, v in snap[dev].items()}


def _state(stats: Any, state: str) -> dict[str, int]:
    from torch.distributed._tools.mem_tracker import _ModState

    return _by_category(stats.snapshots[_ModState[state]][0])


def _one_mode(cfg_dict: dict, comm: Any, hf: bool) -> dict[str, Any]:
    from torch.distributed._tools.mem_tracker import MemTracker

    from lshmoe.train.gpt_task import GPTTask
    from lshmoe.train.loop import Trainer

    cfg = from_dict(cfg_dict)
    if hf:
        from lshmoe.hf.task import task_for

        task = task_for(cfg.model.hf)
    else:
        task = GPTTask()
    tr = Trainer(cfg, comm, task)
    tracker = MemTracker()
    tracker.track_external(tr.model, tr.opt)
    x, y = tr.data.train_batch(0, comm.rank, cfg.train.batch_size, cfg.model.seq_len, cfg.train.seed, comm.device)
    blocks = tr.task.moe_layers(tr.model)
    with tracker:
        with tr._compute():  # NOTE: the loop's own autocast (bf16 mixed precision without FSDP)
            out = tr.task.forward(tr.model, x, y)
        after_forward = _by_category(tracker.get_tracker_snapshot())
        out.loss.backward()
        peak = _by_category(tracker.get_tracker_snapshot("peak"))
    per_block = []
    for b in blocks:
        stats = tracker.memory_tracking[b]
        per_block.append(_state(stats, "POST_FW")["ACT"] - _state(stats, "PRE_FW")["ACT"])
    return {"saved": after_forward["ACT"], "per_block": per_block, "peak": peak["ACT"] + peak["TEMP"]}


def ac_worker(comm: Any, cfg_dicts: dict[str, dict], hf: bool) -> dict[str, dict[str, Any]]:
    """Every AC mode of one model and dtype (`cfg_dicts`: mode -> config) measured in turn."""
    return {mode: _one_mode(cfg, comm, hf) for mode, cfg in cfg_dicts.items()}


MOE_TERMS = ("moe.router", "moe.indices", "moe.received", "moe.expert_hidden", "moe.combine")


def formula(shape: Any, dtype: str, seq_len: int, batch: int) -> dict[str, Any]:
    """The plan's saved activations per mode (whole model, and one MoE layer's `moe.*` terms) and the
    expert hidden state one MoE layer saves without AC."""
    from lshmoe.plan import Setting, Workload, activation_bytes

    w, layers = Workload(seq_len=seq_len, batch_size=batch), max(1, shape.moe_layers)
    out: dict[str, Any] = {"saved": {}, "block": {}}
    for mode in MODES:
        act = activation_bytes(shape, Setting(world=1, ep=1, dtype=dtype, ac=mode), w)
        out["saved"][mode] = sum(act.saved.values())
        out["block"][mode] = sum(act.saved.get(k, 0) for k in MOE_TERMS) // layers
        if mode == "experts":
            out["expert_hidden_per_layer"] = act.removed["moe.expert_hidden"] // layers
    return out


def rows(model: str, dtype: str, measured: dict[str, dict[str, Any]], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per mode: measured and formula saved bytes, per-block bytes, and what AC removed."""
    none_block = _mean(measured["none"]["per_block"])
    out = []
    for mode in MODES:
        m = measured[mode]
        block = _mean(m["per_block"])
        out.append(
            {
                "model": model,
                "dtype": dtype,
                "ac": mode,
                "saved_bytes": m["saved"],
                "saved_formula_bytes": plan["saved"][mode],
                "block_bytes": block,
                "block_removed_bytes": none_block - block,
                "expert_hidden_formula_bytes": plan["expert_hidden_per_layer"],
                "block_formula_bytes": plan["block"][mode],
                "peak_act_temp_bytes": m["peak"],
            }
        )
    return out


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


__all__ = ["MODES", "ac_worker", "formula", "rows"]
