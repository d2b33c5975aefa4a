"""Lina in training: all-to-all priority over the gradient all-reduce, on the emulated cluster.

Three ways to synchronise dense gradients, trained side by side in the same rank processes on 2
emulated nodes x 2 ranks by default (interleaved blocks of steps, `bench/ab_worker.py`):
  sync      all-reduce after the backward pass (no overlap, so no contention: the reference);
  fair      DDP-like: chunks issued as soon as their gradients are ready, sharing the link with the
            backward all-to-alls (the contention Lina measured, ~1.8x median all-to-all slowdown);
  priority  Lina: chunks only while no all-to-all is queued or running, never inside a backward MoE window.
The model is dense-heavy (D=256, the dense gradient outweighs the all-to-all payload), as in Lina's setting.

All-to-all slowdown: each backward all-to-all's duration divided by the median duration of the same
all-to-all under `sync` (median and worst over steps and layers). Step-time speedup: fair / priority.

Run: `lshmoe bench lina-train --link 1gbit`.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from lshmoe.bench.cluster import summarise
from lshmoe.bench.harness import ABSpec, add_ab_args, base_config, bench_parser, cluster_from, recorded_args, run_ab
from lshmoe.bench.report import md_table, median, save_plot, write_section
from lshmoe.bench.variants import apply
from lshmoe.data import load_data

DENSE_HEAVY = ["model.d_model=256", "model.n_heads=8", "moe.d_expert=256", "train.batch_size=8"]


def slowdowns(res: dict, variant: str, reference: str = "sync") -> list[float]:
    """Per backward all-to-all (tag and step): duration / median duration of that tag under `reference`."""
    ref: dict[str, list[float]] = {}
    for step in res["variants"][reference]["by_tag_rank0"]:
        for k, v in step.items():
            if k.endswith("@backward") and not k.split("@")[0].endswith(".counts"):
                ref.setdefault(k, []).append(v)
    base = {k: statistics.median(v) for k, v in ref.items()}
    out = []
    for step in res["variants"][variant]["by_tag_rank0"]:
        out += [v / base[k] for k, v in step.items() if k in base and base[k] > 0]
    return out


def parser() -> argparse.ArgumentParser:
    p = bench_parser("lshmoe bench lina-train", __doc__, link="1gbit")
    p.add_argument("--chunk-mb", type=float, default=2.0, help="micro-op size (scaled down with the model)")
    return add_ab_args(p, rounds=6)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    cluster = cluster_from(a, "lshmoe bench lina-train")
    base = base_config([*DENSE_HEAVY, f"train.chunk_mb={a.chunk_mb}", *a.set])
    cfgs = {pol: apply(base, {"train.grad_sync": pol}, cluster.world).to_dict() for pol in ("sync", "fair", "priority")}
    load_data(base.data, print)
    res = run_ab(ABSpec(cfgs, a.rounds, 1, a.steps_per_round, evaluate=False), cluster)
    tokens = cluster.world * base.train.batch_size * base.model.seq_len
    rows = {r["variant"]: r for r in summarise(res, tokens, baseline="sync")}
    table_rows = []
    for pol in ("sync", "fair", "priority"):
        sd = slowdowns(res, pol) if pol != "sync" else [1.0]
        rows[pol]["a2a_slowdown_median"] = median(sd)
        rows[pol]["a2a_slowdown_worst"] = max(sd)
        table_rows.append(
            [
                pol,
                1000 * rows[pol]["step_s"],
                rows[pol]["tokens_per_s"],
                1000 * median(res["variants"][pol]["a2a_time_s"]),
                f"{rows[pol]['a2a_slowdown_median']:.2f}x",
                f"{rows[pol]['a2a_slowdown_worst']:.2f}x",
                f"{rows['fair']['step_s'] / rows[pol]['step_s']:.2f}x",
            ]
        )
    tbl = md_table(
        [
            "gradient sync",
            "step ms",
            "tokens/s",
            "a2a ms/step",
            "a2a slowdown (median)",
            "a2a slowdown (worst)",
            "speedup vs fair",
        ],
        table_rows,
    )
    print(tbl)
    png = _plot(res, a.out)
    where = cluster.where()
    body = (
        f"{where}; dense-heavy GPT-MoE ({', '.join(DENSE_HEAVY)}), gradient micro-ops of {a.chunk_mb} MB; "
        f"{a.rounds} measured rounds of {a.steps_per_round} steps per policy after a warm-up round. "
        "Slowdown: backward all-to-all duration over its median duration under `sync` (rank 0, every MoE "
        f"layer, dispatch and combine).\n\n{tbl}\n\n![lina]({png})\n"
    )
    title = "Lina: all-to-all priority over the gradient all-reduce"
    write_section(a.out, "lina_train", title, body, {"rows": rows, "raw": res, "args": recorded_args(a)})
    return 0


def _plot(res: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for pol in ("fair", "priority"):
        sd = sorted(slowdowns(res, pol))
        ax.plot(sd, [(i + 1) / len(sd) for i in range(len(sd))], label=pol)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set(
        xlabel="backward all-to-all duration / isolated (sync) median",
        ylabel="CDF",
        title="all-to-all slowdown under contention",
    )
    ax.legend()
    return save_plot(fig, out, "lina_train")


if __name__ == "__main__":
    raise SystemExit(main())
