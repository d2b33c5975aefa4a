"""Model quality side by side: variants trained for the same tokens over several seeds.

Each (seed, variant) is a full `lshmoe train` job (on the emulated cluster by default, so the wall
time is that of a throttled link); jobs of one seed run back to back with the variant order rotating
per seed. The report gives the final validation loss (mean +- std over seeds) and its change against
the baseline, training tokens/s, loss-versus-step and loss-versus-wall-time curves, and the
time-to-target speedup: the training time (validation excluded) each run needs to first reach the
target loss, the worst final validation loss of the baseline seeds (so every baseline run reaches
it), interpolated between evaluations, against the baseline's; and each variant's compression rate
(rows sent / rows routed over the whole run).

Evaluation (`--eval`): `exact` (default) reads `val_loss`, the validation loss with exact experts (the
model a user deploys; a compressed model's loss as trained is `val_loss_compressed`), `compressed`
reads `val_loss_compressed` (`val_loss` where a run has no such field, e.g. an uncompressed one).
`--preset` runs a named study (bench/quality_presets.py: `grad-path`, `ablation`); `--work DIR` keeps
the runs there and reuses every finished one, so a long study can be stopped and started again.

Run: `lshmoe bench quality --seeds 0,1,2` (add `--no-emulation` to train on loopback).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from lshmoe.bench.harness import base_config, bench_parser, cluster_from, recorded_args, run_training
from lshmoe.bench.quality_presets import PRESETS, Preset
from lshmoe.bench.report import md_table, median, save_plot, write_section
from lshmoe.bench.variants import apply, parse_variant
from lshmoe.config import SCRATCH_LR
from lshmoe.data import load_data

EVALS = ("exact", "compressed")
BASIC = ["baseline", "lsh", "lsh-comp"]


def val_loss(e: dict, mode: str = "exact") -> float:
    """An eval record's validation loss: `val_loss` (exact experts), or as trained (`compressed`)."""
    return e.get("val_loss_compressed", e["val_loss"]) if mode == "compressed" else e["val_loss"]


def time_to_target(evals: list[dict], target: float, mode: str = "exact") -> float | None:
    """Training seconds at which the validation loss first reaches `target` (linear interpolation)."""
    prev = None
    for e in evals:
        if val_loss(e, mode) <= target:
            if prev is None:
                return e["train_time_s"]
            frac = (val_loss(prev, mode) - target) / max(1e-12, val_loss(prev, mode) - val_loss(e, mode))
            return prev["train_time_s"] + frac * (e["train_time_s"] - prev["train_time_s"])
        prev = e
    return None


def compression_rate(recs: list[dict]) -> float | None:
    """Rows sent / rows routed over a run's training records (None without MoE rows)."""
    train = [r for r in recs if r["kind"] == "train" and r.get("rows_routed")]
    routed = sum(r["rows_routed"] for r in train)
    return sum(r["rows_sent"] for r in train) / routed if routed else None


def summarise(
    runs: dict[str, dict[int, list[dict]]], baseline: str = "baseline", mode: str = "exact"
) -> tuple[list[dict], float | None]:
    """Per-variant final losses (`mode`: exact or compressed evaluation; both are in each row when the
    runs have them), compression rate, tokens/s and time-to-target against `baseline` (the first
    variant when no variant has that name, e.g. `--variants top2,shared,scmoe-pos2`)."""
    if baseline not in runs and runs:
        baseline = next(iter(runs))
    last = {v: [[r for r in recs if r["kind"] == "eval"][-1] for recs in seeds.values()] for v, seeds in runs.items()}
    finals = {v: [val_loss(e, mode) for e in evals] for v, evals in last.items()}
    target = max(finals[baseline]) if baseline in finals else None
    rows = []
    for v, seeds in runs.items():
        tps = [[r for r in recs if r["kind"] == "summary"][0]["median_tokens_per_s"] for recs in seeds.values()]
        ttt = [
            time_to_target([r for r in recs if r["kind"] == "eval"], target, mode) if target else None
            for recs in seeds.values()
        ]
        rates = [x for x in (compression_rate(recs) for recs in seeds.values()) if x is not None]
        mean = statistics.mean(finals[v])
        row = {
            "variant": v,
            "val_mean": mean,
            "val_std": statistics.stdev(finals[v]) if len(finals[v]) > 1 else 0.0,
            "val_per_seed": finals[v],
            "tokens_per_s": median(tps),
            "time_to_target_s": ttt,
            "rate": statistics.mean(rates) if rates else None,
        }
        if all("val_loss_compressed" in e for e in last[v]):
            comp = [e["val_loss_compressed"] for e in last[v]]
            row["val_exact_mean"] = statistics.mean([e["val_loss"] for e in last[v]])
            row["val_compressed_mean"] = statistics.mean(comp)
        if baseline in finals:
            row["delta_pct"] = 100 * (mean / statistics.mean(finals[baseline]) - 1)
        rows.append(row)
    base_ttt = next((r["time_to_target_s"] for r in rows if r["variant"] == baseline), None)
    for r in rows:
        reached = [t for t in r["time_to_target_s"] if t is not None]
        if base_ttt and len(reached) == len(r["time_to_target_s"]):
            r["ttt_speedup"] = statistics.mean(base_ttt) / statistics.mean(reached)
        else:
            r["ttt_speedup"] = None
        r["ttt_reached"] = f"{len(reached)}/{len(r['time_to_target_s'])}"
    return rows, target


def _plot(runs: dict[str, dict[int, list[dict]]], out: Path, name: str, mode: str = "exact") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for v, seeds in runs.items():
        color = None
        for i, recs in enumerate(seeds.values()):
            ev = [r for r in recs if r["kind"] == "eval"]
            (line,) = axes[0].plot(
                [e["step"] for e in ev],
                [val_loss(e, mode) for e in ev],
                color=color,
                alpha=0.8,
                label=v if i == 0 else None,
            )
            color = line.get_color()
            axes[1].plot(
                [e["train_time_s"] for e in ev],
                [val_loss(e, mode) for e in ev],
                color=color,
                alpha=0.8,
                label=v if i == 0 else None,
            )
    axes[0].set(xlabel="step (same tokens for every variant)", ylabel=f"validation loss ({mode})")
    axes[1].set(xlabel="training wall time (s, validation excluded)", ylabel="validation loss")
    for ax in axes:
        ax.legend(fontsize=8)
    return save_plot(fig, out, name)


def parser() -> argparse.ArgumentParser:
    p = bench_parser("lshmoe bench quality", __doc__, name="quality", link="1gbit")
    p.add_argument(
        "--variants",
        default=None,
        help=(
            "comma list (bench/variants.py), or names of the preset's variants "
            "[default: baseline,lsh,lsh-comp, or the preset's]"
        ),
    )
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named study: its variants, steps and report")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=None, help="[default: the preset's, else 300]")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval", choices=EVALS, default="exact", help="which validation loss the table quotes")
    p.add_argument("--work", type=Path, default=None, help="keep the runs here; finished ones are reused")
    return p


def _run_or_reuse(cfg, cluster, run_dir: Path) -> list[dict]:
    """A finished run in `run_dir` (its summary written) is read back; anything else is run afresh."""
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if any(r["kind"] == "summary" for r in recs) and any(r["kind"] == "eval" for r in recs):
            print(f"   reusing the finished run in {run_dir}", flush=True)
            return recs
        shutil.rmtree(run_dir)
    return run_training(cfg, cluster, run_dir)


def variant_specs(arg: str | None, preset: Preset | None, lr: float) -> list[str]:
    """The variant specs to run: `--variants` (where a name of the preset's variants stands for its
    spec, so `--preset grad-path --variants baseline,exact-gp1` runs part of a study), else the
    preset's, else the basic three."""
    named = preset.variants(lr) if preset else BASIC
    by_name = {parse_variant(v)[0]: v for v in named}
    return [by_name.get(v, v) for v in arg.split(",")] if arg else list(named)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    preset = PRESETS.get(a.preset)
    if preset is not None and a.name == "quality":
        a.name = preset.name
    a.steps = a.steps or (preset.steps if preset else 300)
    cluster = cluster_from(a, "lshmoe bench quality")
    world = cluster.world
    base = base_config(a.set)
    base.train.steps, base.train.eval_every, base.train.log_every = a.steps, a.eval_every, a.eval_every
    specs = variant_specs(a.variants, preset, base.train.lr or SCRATCH_LR)
    variants = dict(parse_variant(v) for v in specs)
    for v in variants.values():  # every variant's config is valid before the first job starts
        apply(base, v, world)
    load_data(base.data, print)
    seeds = [int(s) for s in a.seeds.split(",")]
    runs: dict[str, dict[int, list[dict]]] = {v: {} for v in variants}
    names = list(variants)
    with tempfile.TemporaryDirectory(prefix="lshmoe-quality-") as tmp:
        work = a.work or Path(tmp)
        for i, seed in enumerate(seeds):
            for v in names[i % len(names) :] + names[: i % len(names)]:
                cfg = apply(base, {**variants[v], "train.seed": str(seed)}, world)
                print(f"== seed {seed} {v}", flush=True)
                runs[v][seed] = _run_or_reuse(cfg, cluster, work / f"{v}-{seed}")
                ev = [r for r in runs[v][seed] if r["kind"] == "eval"]
                print(
                    f"   final val loss {val_loss(ev[-1], a.eval):.4f} after {ev[-1]['train_time_s']:.0f} s", flush=True
                )
    ref = "baseline" if "baseline" in runs else next(iter(runs))
    rows, target = summarise(runs, ref, a.eval)
    tbl = md_table(
        [
            "variant",
            f"final val loss, {a.eval} (mean ± std)",
            f"vs {ref}",
            "per seed",
            "tokens/s",
            "reached target",
            "time-to-target speedup",
            "rate",
            "val loss exact / as trained",
        ],
        [
            [
                r["variant"],
                f"{r['val_mean']:.4f} ± {r['val_std']:.4f}",
                f"{r.get('delta_pct', 0):+.2f}%",
                ", ".join(f"{x:.3f}" for x in r["val_per_seed"]),
                r["tokens_per_s"],
                r["ttt_reached"],
                f"{r['ttt_speedup']:.2f}x" if r["ttt_speedup"] else "-",
                f"{100 * r['rate']:.1f}%" if r["rate"] is not None else "-",
                f"{r['val_exact_mean']:.4f} / {r['val_compressed_mean']:.4f}" if "val_exact_mean" in r else "-",
            ]
            for r in rows
        ],
    )
    print(tbl)
    png = _plot(runs, a.out, a.name, a.eval)
    extra = preset.report(rows, a.out, a.name) if preset else ""
    where = cluster.where()
    body = (
        f"{len(seeds)} seeds x {len(names)} variants, {a.steps} steps each ({base.train.batch_size} seqs x "
        f"{base.model.seq_len} tokens per rank per step, same data order per seed), {where}. Validation every "
        f"{a.eval_every} steps on {base.train.eval_batches} batches per rank, the loss quoted with "
        f"{'exact experts' if a.eval == 'exact' else 'the experts as trained (compressed)'}. Target loss for "
        f"time-to-target: {target:.4f} (the worst {ref} seed's final loss). Rate: rows sent / rows routed over "
        f"the run.\n\n{tbl}\n\n![quality]({png})\n\n{extra}\nVariants: "
        + "; ".join(f"`{n}` = {', '.join(f'{k}={v}' for k, v in o.items())}" for n, o in variants.items())
        + "\n"
    )
    title = "Model quality: same tokens, several seeds" + ("" if a.name == "quality" else f" ({a.name})")
    write_section(a.out, a.name, title, body, {"rows": rows, "target": target, "runs": runs, "args": recorded_args(a)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
