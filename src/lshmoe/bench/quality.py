"""Model quality side by side: variants trained for the same tokens over several seeds.

Each (seed, variant) is a full `lshmoe train` job (on the emulated cluster by default, so the wall
time is that of a throttled link); jobs of one seed run back to back with the variant order rotating
per seed. The report gives the final validation loss (mean +- std over seeds) and its change against
the baseline, training tokens/s, loss-versus-step and loss-versus-wall-time curves, and the
time-to-target speedup: the training time (validation excluded) each run needs to first reach the
target loss, the worst final validation loss of the baseline seeds (so every baseline run reaches
it), interpolated between evaluations, against the baseline's.

Run: `lshmoe bench quality --seeds 0,1,2` (add `--no-emulation` to train on loopback).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from lshmoe.bench.harness import base_config, bench_parser, cluster_from, recorded_args, run_training
from lshmoe.bench.report import md_table, median, save_plot, write_section
from lshmoe.bench.variants import apply, parse_variant
from lshmoe.data import load_data


def time_to_target(evals: list[dict], target: float) -> float | None:
    """Training seconds at which the validation loss first reaches `target` (linear interpolation)."""
    prev = None
    for e in evals:
        if e["val_loss"] <= target:
            if prev is None:
                return e["train_time_s"]
            frac = (prev["val_loss"] - target) / max(1e-12, prev["val_loss"] - e["val_loss"])
            return prev["train_time_s"] + frac * (e["train_time_s"] - prev["train_time_s"])
        prev = e
    return None


def summarise(runs: dict[str, dict[int, list[dict]]], baseline: str = "baseline") -> tuple[list[dict], float | None]:
    """Per-variant final losses, tokens/s and time-to-target against `baseline` (the first variant when
    no variant has that name, e.g. `--variants top2,shared,scmoe-pos2`)."""
    if baseline not in runs and runs:
        baseline = next(iter(runs))
    finals = {
        v: [[r for r in recs if r["kind"] == "eval"][-1]["val_loss"] for recs in seeds.values()]
        for v, seeds in runs.items()
    }
    target = max(finals[baseline]) if baseline in finals else None
    rows = []
    for v, seeds in runs.items():
        tps = [[r for r in recs if r["kind"] == "summary"][0]["median_tokens_per_s"] for recs in seeds.values()]
        ttt = [
            time_to_target([r for r in recs if r["kind"] == "eval"], target) if target else None
            for recs in seeds.values()
        ]
        mean = statistics.mean(finals[v])
        row = {
            "variant": v,
            "val_mean": mean,
            "val_std": statistics.stdev(finals[v]) if len(finals[v]) > 1 else 0.0,
            "val_per_seed": finals[v],
            "tokens_per_s": median(tps),
            "time_to_target_s": ttt,
        }
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


def _plot(runs: dict[str, dict[int, list[dict]]], out: Path, name: str) -> str:
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
                [e["val_loss"] for e in ev],
                color=color,
                alpha=0.8,
                label=v if i == 0 else None,
            )
            color = line.get_color()
            axes[1].plot(
                [e["train_time_s"] for e in ev],
                [e["val_loss"] for e in ev],
                color=color,
                alpha=0.8,
                label=v if i == 0 else None,
            )
    axes[0].set(xlabel="step (same tokens for every variant)", ylabel="validation loss")
    axes[1].set(xlabel="training wall time (s, validation excluded)", ylabel="validation loss")
    for ax in axes:
        ax.legend(fontsize=8)
    return save_plot(fig, out, name)


def parser() -> argparse.ArgumentParser:
    p = bench_parser("lshmoe bench quality", __doc__, name="quality", link="1gbit")
    p.add_argument("--variants", default="baseline,lsh,lsh-comp")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    cluster = cluster_from(a, "lshmoe bench quality")
    world = cluster.world
    base = base_config(a.set)
    base.train.steps, base.train.eval_every, base.train.log_every = a.steps, a.eval_every, a.eval_every
    variants = dict(parse_variant(v) for v in a.variants.split(","))
    load_data(base.data, print)
    seeds = [int(s) for s in a.seeds.split(",")]
    runs: dict[str, dict[int, list[dict]]] = {v: {} for v in variants}
    names = list(variants)
    with tempfile.TemporaryDirectory(prefix="lshmoe-quality-") as tmp:
        for i, seed in enumerate(seeds):
            for v in names[i % len(names) :] + names[: i % len(names)]:
                cfg = apply(base, {**variants[v], "train.seed": str(seed)}, world)
                print(f"== seed {seed} {v}", flush=True)
                runs[v][seed] = run_training(cfg, cluster, Path(tmp) / f"{v}-{seed}")
                ev = [r for r in runs[v][seed] if r["kind"] == "eval"]
                print(f"   final val loss {ev[-1]['val_loss']:.4f} after {ev[-1]['train_time_s']:.0f} s", flush=True)
    ref = "baseline" if "baseline" in runs else next(iter(runs))
    rows, target = summarise(runs, ref)
    tbl = md_table(
        [
            "variant",
            "final val loss (mean ± std)",
            f"vs {ref}",
            "per seed",
            "tokens/s",
            "reached target",
            "time-to-target speedup",
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
            ]
            for r in rows
        ],
    )
    print(tbl)
    png = _plot(runs, a.out, a.name)
    where = cluster.where()
    body = (
        f"{len(seeds)} seeds x {len(names)} variants, {a.steps} steps each ({base.train.batch_size} seqs x "
        f"{base.model.seq_len} tokens per rank per step, same data order per seed), {where}. Validation every "
        f"{a.eval_every} steps on {base.train.eval_batches} batches per rank. Target loss for time-to-target: "
        f"{target:.4f} (the worst {ref} seed's final loss).\n\n{tbl}\n\n![quality]({png})\n\nVariants: "
        + "; ".join(f"`{n}` = {', '.join(f'{k}={v}' for k, v in o.items())}" for n, o in variants.items())
        + "\n"
    )
    title = "Model quality: same tokens, several seeds" + ("" if a.name == "quality" else f" ({a.name})")
    write_section(a.out, a.name, title, body, {"rows": rows, "target": target, "runs": runs, "args": recorded_args(a)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
