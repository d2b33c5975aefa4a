"""How LSH-MoE's compression rate evolves over a long run of the default model.

The rate (rows sent / rows routed) is not a constant of the method: early in training the MoE
inputs are highly clustered and few centroids stand for many rows; as the model learns, its
representations spread out and more buckets are needed. This benchmark trains the default GPT-MoE
with `--compress lsh` (the defaults: cross-polytope, b = 4, L = 6) through the real CLI and plots
each MoE layer's rate against the step, with the validation loss beside it.

Run: `lshmoe bench rate --steps 3000` (2 ranks on loopback; the rate does not depend on the link),
or `--metrics PATH/metrics.jsonl` to report an existing run.
"""

from __future__ import annotations

import json
from pathlib import Path

from lshmoe.bench.harness import DEFAULT_OUT, Cluster, bench_parser, recorded_args, run_training
from lshmoe.bench.report import md_table, save_plot, write_section
from lshmoe.config import Config, apply_sets, set_value

MARKS = (25, 50, 100, 250, 500, 1000, 1500, 2000, 2500, 3000)  # steps the table reports


def curves(records: list[dict]) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, float]]]:
    """(layer -> [(step, rate)], [(step, val loss)]) from a run's metrics records."""
    rates: dict[str, list[tuple[int, float]]] = {}
    val = []
    for r in records:
        if r.get("kind") == "train":
            for layer, stats in sorted(r.get("layers", {}).items()):
                if "compression_rate" in stats:
                    rates.setdefault(layer, []).append((r["step"], stats["compression_rate"]))
        elif r.get("kind") == "eval":
            val.append((r["step"], r["val_loss"]))
    return rates, val


def _at(series: list[tuple[int, float]], step: int) -> float | None:
    """The value logged at the last step <= `step` (None before the first)."""
    best = None
    for s, v in series:
        if s <= step:
            best = v
    return best


def _plot(rates: dict, val: list, out: Path, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for layer, series in rates.items():
        ax.plot([s for s, _ in series], [100 * v for _, v in series], label=f"{layer} rate")
    ax.set(xlabel="training step", ylabel="rows sent / rows routed (%)", ylim=(0, None))
    if val:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in val], [v for _, v in val], "k--", marker="o", ms=3, label="val loss")
        ax2.set_ylabel("validation loss")
        ax2.legend(loc="upper center", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    return save_plot(fig, out, name)


def parser():
    p = bench_parser("lshmoe bench rate", __doc__, cluster=False, name="lsh_rate")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--metrics", type=Path, default=None, help="report this run's metrics.jsonl instead of training")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.metrics is not None:
        if not a.metrics.is_file():
            print(f"lshmoe bench rate: error: --metrics {a.metrics}: no such file")
            return 2
        records = [json.loads(line) for line in a.metrics.read_text().splitlines() if line.strip()]
    else:
        cfg = apply_sets(Config(), a.set)  # the default model and training recipe, not the benchmark batch
        for k, v in (("moe.compress", "lsh"), ("train.steps", a.steps), ("train.eval_every", a.eval_every)):
            set_value(cfg, k, str(v))
        set_value(cfg, "train.progress", "false")
        set_value(cfg, "dist.threads", "1")
        run_dir = DEFAULT_OUT / f"{a.name}_run"  # the training run stays out of the report
        records = run_training(cfg, Cluster(nodes=1, ranks_per_node=a.nproc), run_dir)
    config = next((r["config"] for r in records if r.get("kind") == "config"), {})
    rates, val = curves(records)
    if not rates:
        print("lshmoe bench rate: error: the run logged no compression_rate (was it trained with --compress lsh?)")
        return 2
    last = max(s for series in rates.values() for s, _ in series)
    marks = [m for m in MARKS if m <= last] + ([last] if last not in MARKS else [])
    head = ["step", *[f"{layer} rate" for layer in rates], "val loss (last eval)"]
    rows = []
    for m in marks:
        vals = [_at(series, m) for series in rates.values()]
        v = _at(val, m)
        rows.append([m, *[f"{100 * x:.1f}%" if x is not None else "-" for x in vals], f"{v:.3f}" if v else "-"])
    print(md_table(head, rows))
    png = _plot(rates, val, a.out, a.name)
    model, lsh, train = config.get("model", {}), config.get("lsh", {}), config.get("train", {})
    body = (
        f"{config.get('world_size', a.nproc)} ranks on loopback. Default GPT-MoE (d_model {model.get('d_model')}, "
        f"{model.get('n_layers')} layers, MoE every {model.get('moe_every')}), `--compress lsh` with the defaults "
        f"(family {lsh.get('family')}, b = {lsh.get('buckets_per_hash')}, L = {lsh.get('num_hashes')}), "
        f"{train.get('steps')} steps of {train.get('batch_size')} sequences x {model.get('seq_len')} tokens per "
        "rank on the embedded docstring corpus. Rate = rows sent / rows routed of each MoE layer at the logged "
        "step (rows summed over the ranks).\n\n"
        f"{md_table(head, rows)}\n\n![rate]({png})\n"
    )
    write_section(
        a.out,
        a.name,
        "LSH-MoE compression rate over training",
        body,
        {"rates": rates, "val_loss": val, "args": recorded_args(a)},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
