"""Memory per rank, measured against `lshmoe plan`'s formula: FSDP2 x EP, bf16 mixed precision and
activation checkpointing on a scaled-up GPT-MoE and a Qwen3-MoE-shaped Hugging Face model.

For each model, W = 1, 2, 4 ranks (gloo, CPU), each of {no FSDP, FSDP} x {float32, bf16 mixed
precision} x {AC none, blocks}, with EP = W and, under FSDP, also EP = W / 2 (each expert bank then
sharded over efsdp = 2 ranks). Every setting trains a few steps through the real loop (`Trainer.run`
on spawned ranks, metrics.jsonl as `lshmoe train` writes it); at the last step, before the optimizer
runs, each rank records its parameter, gradient and AdamW bytes from its local shards
(train/memory.py's `state_bytes`). Reported against the formula's `params.master`, `grads.local` and
`optim.adamw` (lshmoe/plan/memory.py): the measured model state per rank, its ratio to the formula
and, under FSDP, to the W = 1 state (target: 1/W within 10% of the formula); the peak RSS of the last
logged interval (max over ranks) beside the formula's whole per-rank total; tokens/s and all-to-all
bytes per step from the metrics. Activation checkpointing is measured separately, in one process
with torch's MemTracker (bench/memory_ac.py): target, AC cuts a MoE block's saved activations by at
least its expert hidden state h x c x R x F.

Run: `lshmoe bench memory --out docs/bench` (about 16 minutes on 2 shared cores); `--quick` runs a tiny
model at W = 1, 2 on a few settings in a minute.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lshmoe.bench import memory_ac, memory_models
from lshmoe.bench.harness import add_out_arg, recorded_args
from lshmoe.bench.report import md_table, median, save_plot, write_section
from lshmoe.config import Config, from_dict
from lshmoe.testing import run_ranks

MB = 2**20
DTYPES = {"float32": None, "bf16-mp": "bfloat16"}  # plan's name -> train.compute_dtype
TARGET = 0.10  # FSDP: measured model state within 10% of the formula and of 1/W


@dataclass(frozen=True, kw_only=True)
class Setting:
    model: str  # gpt | hf
    world: int
    ep: int
    fsdp: bool
    dtype: str  # float32 | bf16-mp
    ac: str  # none | blocks

    @property
    def label(self) -> str:
        return (
            f"W{self.world} EP{self.ep} {'FSDP' if self.fsdp else 'no FSDP'} {self.dtype} "
            f"AC {self.ac if self.ac != 'none' else 'off'}"
        )


def settings(models: list[str], worlds: list[int], dtypes: list[str], acs: list[str]) -> list[Setting]:
    """The matrix: EP = W without and with FSDP; under FSDP also EP = W / 2 (experts sharded over 2)."""
    out = []
    for model in models:
        for w in worlds:
            layouts = [(w, False)] + ([(w, True)] if w > 1 else []) + ([(w // 2, True)] if w > 1 else [])
            for ep, fsdp in layouts:
                for dtype in dtypes:
                    for ac in acs:
                        out.append(Setting(model=model, world=w, ep=ep, fsdp=fsdp, dtype=dtype, ac=ac))
    return out


# ----------------------------------------------------------------------------------- one run


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _train_worker(comm: Any, cfg_dict: dict, hf: bool) -> dict[str, int]:
    """`Trainer.run` on this rank; its state bytes read before the last optimizer step, when the
    gradients are reduced and AdamW's state exists (the loop's own metric reads after zero_grad)."""
    from lshmoe.train.gpt_task import GPTTask
    from lshmoe.train.loop import Trainer
    from lshmoe.train.memory import state_bytes

    rss_start = _rss_bytes()
    cfg = from_dict(cfg_dict)
    if hf:
        from lshmoe.hf.task import task_for

        task = task_for(cfg.model.hf)
    else:
        task = GPTTask()
    tr = Trainer(cfg, comm, task)
    seen: dict[str, int] = {}

    def before_step(opt, *_):
        seen.clear()
        seen.update(state_bytes(tr.model, opt))
        steps = [v for st in opt.state.values() for k, v in st.items() if k == "step"]
        seen["optim_step_bytes"] = sum(int(t.numel() * t.element_size()) for t in steps)

    tr.opt.register_step_pre_hook(before_step)
    tr.run()
    return {**seen, "rss_start_bytes": rss_start}


def config_for(s: Setting, base: Config, steps: int) -> Config:
    cfg = from_dict(base.to_dict())
    cfg.dist.fsdp, cfg.moe.ep_size, cfg.dist.nproc = s.fsdp, s.ep, s.world
    cfg.train.compute_dtype, cfg.train.ac = DTYPES[s.dtype], s.ac
    cfg.train.steps, cfg.train.log_every = steps, max(1, steps // 2)
    return cfg


def measure(s: Setting, base: Config, steps: int, work: Path) -> dict[str, Any]:
    """Train `steps` steps of setting `s` on W spawned ranks; its measured numbers."""
    cfg = config_for(s, base, steps)
    cfg.train.out_dir = str(work)
    per_rank = run_ranks(_train_worker, s.world, cfg.to_dict(), s.model == "hf", ep_size=s.ep, timeout_s=300)
    recs = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if r["kind"] == "train"][-1]
    keys = ("mem_params_bytes", "mem_grads_bytes", "mem_optim_bytes")
    state = [sum(r[k] for k in keys) - r["optim_step_bytes"] for r in per_rank]
    return {
        "params_bytes": max(r["mem_params_bytes"] for r in per_rank),
        "grads_bytes": max(r["mem_grads_bytes"] for r in per_rank),
        "optim_bytes": max(r["mem_optim_bytes"] - r["optim_step_bytes"] for r in per_rank),
        "optim_step_counter_bytes": max(r["optim_step_bytes"] for r in per_rank),
        "state_bytes": max(state),
        "state_bytes_min": min(state),
        "loop_metrics": {k: last[k] for k in ("mem_params_bytes", "mem_grads_bytes", "mem_optim_bytes")},
        "peak_rss_bytes": last["peak_rss_bytes"],
        "rss_start_bytes": max(r["rss_start_bytes"] for r in per_rank),
        "tokens_per_s": last["tokens_per_s"],
        "a2a_bytes": last["a2a_bytes"],
        "allreduce_bytes": last["allreduce_bytes"],
        "compression_rate": last["compression_rate"],
    }


def planned(s: Setting, shape: Any, cfg: Config) -> dict[str, int]:
    """The formula's bytes per rank for `s`: the measured terms, the whole state and the total."""
    from lshmoe.plan import Setting as PlanSetting
    from lshmoe.plan import Workload, memory_per_rank

    ps = PlanSetting(world=s.world, ep=s.ep, fsdp=s.fsdp, dtype=s.dtype, ac=s.ac)
    b = memory_per_rank(shape, ps, Workload(seq_len=cfg.model.seq_len, batch_size=cfg.train.batch_size))
    t = b.state.terms
    return {
        "params_bytes": t["params.master"],
        "grads_bytes": t["grads.local"],
        "optim_bytes": t["optim.adamw"],
        "state_bytes": t["params.master"] + t["grads.local"] + t["optim.adamw"],
        "state_peak_bytes": b.state.total,
        "activation_bytes": b.activation_bytes,
        "total_bytes": b.total,
    }


# ----------------------------------------------------------------------------------- the matrix


def run_matrix(a: argparse.Namespace, configs: dict[str, Config], shapes: dict[str, Any]) -> list[dict]:
    rows = []
    todo = settings(a.models, a.worlds, a.dtypes, a.acs)
    for i, s in enumerate(todo):
        print(f"== [{i + 1}/{len(todo)}] {s.model} {s.label}", flush=True)
        with tempfile.TemporaryDirectory(prefix="lshmoe-mem-") as tmp:
            got = measure(s, configs[s.model], a.steps, Path(tmp))
        plan = planned(s, shapes[s.model], configs[s.model])
        rows.append({**asdict(s), "measured": got, "plan": plan})
        print(
            f"   state {got['state_bytes'] / MB:.1f} MB/rank (formula {plan['state_bytes'] / MB:.1f}), "
            f"peak RSS {got['peak_rss_bytes'] / MB:.0f} MB, {got['tokens_per_s']:.0f} tok/s",
            flush=True,
        )
    _relate(rows)
    return rows


def _relate(rows: list[dict]) -> None:
    """Each row's state against the same model's W = 1 row (same dtype and AC): the 1/W check."""
    ones = {(r["model"], r["dtype"], r["ac"]): r for r in rows if r["world"] == 1}
    for r in rows:
        one = ones.get((r["model"], r["dtype"], r["ac"]))
        m, p = r["measured"], r["plan"]
        r["vs_formula"] = m["state_bytes"] / p["state_bytes"]
        r["vs_w1"] = m["state_bytes"] / one["measured"]["state_bytes"] if one else None
        r["vs_w1_formula"] = p["state_bytes"] / one["plan"]["state_bytes"] if one else None
        if r["fsdp"]:
            fsdp_ok = abs(r["vs_formula"] - 1) <= TARGET
            if one:
                fsdp_ok = fsdp_ok and abs(r["vs_w1"] * r["world"] - 1) <= TARGET
            r["fsdp_target_met"] = fsdp_ok


def run_ac(a: argparse.Namespace, configs: dict[str, Config], shapes: dict[str, Any]) -> list[dict]:
    rows = []
    for model in a.models:
        for dtype in a.dtypes:
            cfgs = {}
            for mode in memory_ac.MODES:
                s = Setting(model=model, world=1, ep=1, fsdp=False, dtype=dtype, ac=mode)
                cfg = config_for(s, configs[model], 1)
                cfg.train.out_dir = str(Path(a.work) / f"ac-{model}-{dtype}-{mode}")
                cfgs[mode] = cfg.to_dict()
            print(f"== activation checkpointing: {model} {dtype} (MemTracker, one process)", flush=True)
            [measured] = run_ranks(memory_ac.ac_worker, 1, cfgs, model == "hf", timeout_s=300)
            cfg = configs[model]
            plan = memory_ac.formula(shapes[model], dtype, cfg.model.seq_len, cfg.train.batch_size)
            rows += memory_ac.rows(model, dtype, measured, plan)
    for r in rows:
        if r["ac"] != "none":
            r["target_met"] = r["block_removed_bytes"] >= r["expert_hidden_formula_bytes"]
    return rows


# ----------------------------------------------------------------------------------- report


def _mb(x: float) -> str:
    return f"{x / MB:.2f}"


def state_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    headers = [
        "model",
        "W",
        "EP",
        "FSDP",
        "dtype",
        "AC",
        "params MB",
        "grads MB",
        "AdamW MB",
        "state MB/rank",
        "formula MB",
        "measured / formula",
        "x of W=1 (formula)",
        "1/W target",
        "formula peak state + activations MB",
        "peak RSS MB",
        "peak RSS - start MB",
        "tokens/s",
        "a2a MB/step",
    ]
    out = []
    for r in rows:
        m, p = r["measured"], r["plan"]
        target = "-"
        if r["fsdp"]:
            target = "met" if r["fsdp_target_met"] else "missed"
        vs_w1 = f"{r['vs_w1']:.3f} ({r['vs_w1_formula']:.3f})" if r["vs_w1"] is not None else "-"
        out.append(
            [
                r["model"],
                r["world"],
                r["ep"],
                "on" if r["fsdp"] else "off",
                r["dtype"],
                r["ac"],
                _mb(m["params_bytes"]),
                _mb(m["grads_bytes"]),
                _mb(m["optim_bytes"]),
                _mb(m["state_bytes"]),
                _mb(p["state_bytes"]),
                f"{r['vs_formula']:.4f}",
                vs_w1,
                target,
                _mb(p["state_peak_bytes"] + p["activation_bytes"]),
                f"{m['peak_rss_bytes'] / MB:.0f}",
                f"{(m['peak_rss_bytes'] - m['rss_start_bytes']) / MB:.0f}",
                f"{m['tokens_per_s']:.0f}",
                f"{m['a2a_bytes'] / MB:.2f}",
            ]
        )
    return headers, out


def ac_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    headers = [
        "model",
        "dtype",
        "AC",
        "saved after forward MB",
        "formula MB",
        "per MoE block MB",
        "formula, MoE terms per layer MB",
        "removed per MoE block MB",
        "expert hidden h·c·R·F MB (formula)",
        "removed / hidden",
        "step peak ACT+TEMP MB",
        "target",
    ]
    out = []
    for r in rows:
        hidden = r["expert_hidden_formula_bytes"]
        out.append(
            [
                r["model"],
                r["dtype"],
                r["ac"],
                _mb(r["saved_bytes"]),
                _mb(r["saved_formula_bytes"]),
                _mb(r["block_bytes"]),
                _mb(r["block_formula_bytes"]),
                _mb(r["block_removed_bytes"]) if r["ac"] != "none" else "-",
                _mb(hidden),
                f"{r['block_removed_bytes'] / hidden:.2f}" if r["ac"] != "none" and hidden else "-",
                _mb(r["peak_act_temp_bytes"]),
                ("met" if r["target_met"] else "missed") if "target_met" in r else "-",
            ]
        )
    return headers, out


def _plot(rows: list[dict], out: Path, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model and r["dtype"] == rows[0]["dtype"] and r["ac"] == rows[0]["ac"]]
        lines = {}
        for r in mine:
            half = r["fsdp"] and r["ep"] < r["world"]
            key = "FSDP, EP = W/2" if half else ("FSDP, EP = W" if r["fsdp"] else "no FSDP, EP = W")
            lines.setdefault(key, []).append(r)
        one = next((r for r in mine if r["world"] == 1), None)
        marks = {"no FSDP, EP = W": ("o", 9), "FSDP, EP = W": ("s", 7), "FSDP, EP = W/2": ("x", 9)}
        for key, rs in lines.items():
            rs = ([one] if one and key.startswith("FSDP") else []) + rs
            ws = [r["world"] for r in rs]
            marker, size = marks[key]
            state = [r["measured"]["state_bytes"] / MB for r in rs]
            (ln,) = ax.plot(ws, state, marker, ms=size, linestyle="none", label=f"{key}: measured")
            plan = [r["plan"]["state_bytes"] / MB for r in rs]
            ax.plot(ws, plan, "--", color=ln.get_color(), label=f"{key}: formula")
        if one:
            ws = sorted({r["world"] for r in mine})
            ideal = [one["measured"]["state_bytes"] / MB / w for w in ws]
            ax.plot(ws, ideal, ":", color="gray", label="1/W of the W = 1 state")
        ax.set(
            xlabel="ranks W",
            ylabel="model state per rank (MB)",
            title=f"{model}: params + grads + AdamW ({rows[0]['dtype']})",
            xticks=sorted({r["world"] for r in mine}),
        )
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.legend(fontsize=7)
    return save_plot(fig, out, name)


def report(
    out: Path,
    name: str,
    rows: list[dict],
    ac_rows: list[dict],
    args: dict,
    models: dict[str, str],
    command: str | None = None,
    meta: dict | None = None,
) -> None:
    h, t = state_table(rows)
    state_md = md_table(h, t)
    ah, at = ac_table(ac_rows)
    ac_md = md_table(ah, at)
    print(state_md)
    print(ac_md)
    png = _plot(rows, out, name) if rows else None
    fsdp = [r for r in rows if r["fsdp"]]
    met = sum(r["fsdp_target_met"] for r in fsdp)
    ratios = [r["vs_formula"] for r in fsdp]
    w1 = [r["vs_w1"] * r["world"] for r in fsdp if r["vs_w1"] is not None]
    ac_on = [r for r in ac_rows if r["ac"] != "none"]
    ac_met = sum(r["target_met"] for r in ac_on)
    tps = {(r["model"], r["world"]): [] for r in rows}
    for r in rows:
        tps[(r["model"], r["world"])].append(r["measured"]["tokens_per_s"])
    fsdp_line = (
        f"**Target 1 (FSDP: model state per rank falls as 1/W, within {TARGET:.0%} of the formula): "
        f"{'met' if met == len(fsdp) else 'missed'}** in {met} of {len(fsdp)} FSDP settings; measured / formula "
        f"{min(ratios):.4f} to {max(ratios):.4f}"
        + (
            f"; measured state x W / the W = 1 state {min(w1):.3f} to {max(w1):.3f} (1 = exactly 1/W; FSDP's "
            "padding of dim 0 to a multiple of the shard count keeps a little more)."
            if w1
            else "."
        )
        if fsdp
        else ""
    )
    ac_line = (
        f"**Target 2 (AC cuts a MoE block's saved activations by at least its expert hidden state h·c·R·F): "
        f"{'met' if ac_met == len(ac_on) else 'missed'}** in {ac_met} of {len(ac_on)} (model, dtype, mode) "
        "measurements."
        if ac_on
        else ""
    )
    body = f"""
{"; ".join(f"**{k}**: {v}" for k, v in models.items())}. {args["steps"]} training steps per setting on W
spawned gloo ranks (1 torch thread each), {args["batch"]} sequences of {args["seq_len"]} tokens per rank per step,
AdamW, the identity compressor. Machine conditions: the 2 cores are shared with other jobs, so tokens/s is
indicative only (one short run per setting, the last logged interval; no speed claim is made from it).

{fsdp_line}

{ac_line}

**Model state per rank.** Parameters, gradients and AdamW moments (step counters excluded, 4 bytes a tensor)
read from each rank's local shards before the last optimizer step, the largest rank{_loop_note(rows)}; the
formula is `lshmoe.plan`'s `params.master + grads.local + optim.adamw` for the same world, EP, FSDP and dtype.
bf16 mixed precision keeps fp32 masters and AdamW state, so its state equals float32's; the bf16 copies are
working memory (the formula's `params.working`, in its peak column). "x of W=1" is the state against the same
model's single-rank state (formula in brackets). "formula peak state + activations" is the plan's whole per-rank
estimate (working copies, FSDP's unsharded units, gradient buckets, activations); peak RSS is the largest rank's
VmHWM over the last logged interval and includes the interpreter, torch, the token data and allocator slack
(hundreds of MB), so it shows trends, not the formula's bytes. a2a MB/step: all-to-all bytes on the wire per
step, summed over the ranks (bf16 halves the payload; 0 at EP 1).

{state_md}

{f"![bytes per rank vs W]({png})" if png else ""}

{_rss_note(rows)}

**Activation checkpointing, per MoE block** (torch's MemTracker, one rank, EP 1 so R = T·K exactly, one
forward of {args["batch"]} x {args["seq_len"]} tokens through the loop's model, its AC wrapping and autocast):
"saved after forward" is the whole model's ACT category after the forward (formula: the plan's saved
activations for that mode); "per MoE block" the ACT a MoE block's forward leaves behind (what it saves for
backward, plus its output); "removed" is that against AC none; the expert hidden state is the formula's
`moe.expert_hidden` per layer, h·c·R·F (h = 2 GELU, 4 SwiGLU). The step peak is the tracker's peak of
activations + temporaries over forward and backward, where a recomputed region comes back one at a time.

{ac_md}

{AC_NOTES if ac_rows else ""}

Median tokens/s over the settings of each (model, W): {
        ", ".join(f"{m} W={w}: {median(v):.0f}" for (m, w), v in tps.items())
    } (indicative).
"""
    title = "Memory per rank: FSDP2 x EP, bf16 mixed precision, activation checkpointing" + (
        "" if name == "memory" else f" ({name})"
    )
    data = {"rows": rows, "ac_rows": ac_rows, "models": models, "args": args}
    write_section(out, name, title, body, data, command=command, meta=meta)


AC_NOTES = """Reading the AC table. In float32 `experts` removes exactly the formula's h·c·R·F per MoE block
(removed / hidden = 1.00). Under bf16 mixed precision without FSDP (autocast) it removes more: the autocast
bf16 copies of the block's expert weights (2 bytes per expert parameter of the layer), which autograd keeps for
backward and a recomputed region does not; the formula books those copies as model state (`params.working`), and
MemTracker counts them as activations, which is also why the measured bf16 "saved" bytes exceed the formula's.
`blocks` in the loop (train/recompute.py) recomputes the attention modules, the dense FFNs and the expert FFNs;
the norms in front of them stay saved (a norm's output is the region's input), as the formula counts them."""


def _rss_note(rows: list[dict]) -> str:
    """Peak RSS of bf16 mixed precision against float32 in the same setting, and of AC blocks against none."""

    def deltas(field: str, a: str, b: str) -> list[float]:
        key = lambda r: tuple(r[k] for k in ("model", "world", "ep", "fsdp", "dtype", "ac") if k != field)  # noqa: E731
        base = {key(r): r for r in rows if r[field] == a}
        return [
            (r["measured"]["peak_rss_bytes"] - base[key(r)]["measured"]["peak_rss_bytes"]) / MB
            for r in rows
            if r[field] == b and key(r) in base
        ]

    bf16, ac = deltas("dtype", "float32", "bf16-mp"), deltas("ac", "none", "blocks")
    if not bf16 and not ac:
        return ""
    parts = []
    if bf16:
        parts.append(
            f"bf16-mp against float32 in the same setting: peak RSS {median(bf16):+.0f} MB (median; "
            f"{min(bf16):+.0f} to {max(bf16):+.0f})"
        )
    if ac:
        parts.append(f"AC blocks against none: {median(ac):+.0f} MB (median; {min(ac):+.0f} to {max(ac):+.0f})")
    return (
        "Peak RSS, "
        + "; ".join(parts)
        + ". bf16 compute raises the CPU process's peak although the formula's bytes fall and MemTracker's "
        "tensor peak changes by only a few MB (the AC table), so the difference is most likely memory outside torch's "
        "tensors (the CPU kernels' bf16 packing and scratch space, allocator slack; not pinned down here), which "
        "the formula, written for GPU tensors, does not model."
    )


def _loop_note(rows: list[dict]) -> str:
    """Say so when the loop's own gradient metric reads 0 (it is taken after `zero_grad(set_to_none=True)`)."""
    if rows and all(r["measured"]["loop_metrics"]["mem_grads_bytes"] == 0 for r in rows):
        return (
            " (the loop's own `mem_grads_bytes` metric reads 0 in every run: the loop logs after "
            "`zero_grad(set_to_none=True)`; its `mem_params_bytes` equals the params column and its "
            "`mem_optim_bytes` the AdamW column plus the step counters)"
        )
    return ""


# ----------------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lshmoe bench memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gpt,hf", help="gpt and/or hf (the Qwen3-MoE shape) [default: gpt,hf]")
    p.add_argument("--worlds", default="1,2,4", help="rank counts W [default: 1,2,4]")
    p.add_argument("--dtypes", default="float32,bf16-mp", help="float32 and/or bf16-mp [default: both]")
    p.add_argument("--acs", default="none,blocks", help="AC modes of the matrix [default: none,blocks]")
    p.add_argument("--steps", type=int, default=4, help="training steps per setting [default: 4]")
    p.add_argument("--quick", action="store_true", help="tiny models (the bench's test)")
    p.add_argument("--no-ac", action="store_true", help="skip the MemTracker measurement of AC")
    p.add_argument("--no-matrix", action="store_true", help="only the MemTracker measurement of AC")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config overrides")
    p.add_argument("--from-json", metavar="PATH", help="re-render the report of a recorded run (its JSON)")
    return add_out_arg(p, name="memory")


def _parse(a: argparse.Namespace) -> argparse.Namespace:
    from lshmoe.errors import UserError

    a.models = [m.strip() for m in a.models.split(",") if m.strip()]
    a.worlds = [int(w) for w in a.worlds.split(",") if w.strip()]
    a.dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    a.acs = [m.strip() for m in a.acs.split(",") if m.strip()]
    for what, vals, ok in (
        ("--models", a.models, memory_models.MODELS),
        ("--dtypes", a.dtypes, tuple(DTYPES)),
        ("--acs", a.acs, memory_ac.MODES),
    ):
        bad = [v for v in vals if v not in ok]
        if bad or not vals:
            raise UserError(f"{what} {','.join(vals)}: choose from {', '.join(ok)}")
    if any(w < 1 or (w > 1 and w % 2) for w in a.worlds):
        raise UserError(f"--worlds {a.worlds}: each W must be 1 or even (EP = W/2 is measured too)")
    if a.steps < 2:
        raise UserError(f"--steps {a.steps}: must be >= 2 (the state is read before the last step's update)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.from_json:
        rec = json.loads(Path(a.from_json).read_text())
        report(a.out, a.name, rec["rows"], rec["ac_rows"], rec["args"], rec["models"], rec["command"], rec["machine"])
        return 0
    a = _parse(a)
    with tempfile.TemporaryDirectory(prefix="lshmoe-bench-memory-") as tmp:
        a.work = tmp
        configs: dict[str, Config] = {}
        if "gpt" in a.models:
            configs["gpt"] = memory_models.gpt_config(a.quick, a.set)
        if "hf" in a.models:
            gpt = memory_models.gpt_config(a.quick, a.set)
            path = memory_models.write_qwen3(Path(tmp) / "qwen3moe", gpt, a.quick)
            configs["hf"] = memory_models.hf_config(path, a.quick, a.set)
        shapes = {k: memory_models.shape_of(k, c) for k, c in configs.items()}
        models = {k: memory_models.describe(k, c) for k, c in configs.items()}
        rows = [] if a.no_matrix else run_matrix(a, configs, shapes)
        ac_rows = [] if a.no_ac else run_ac(a, configs, shapes)
    first = next(iter(configs.values()))
    args = {**recorded_args(a), "batch": first.train.batch_size, "seq_len": first.model.seq_len}
    args.pop("work", None)
    report(a.out, a.name, rows, ac_rows, args, models)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
