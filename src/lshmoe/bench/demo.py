"""`lshmoe demo`: baseline vs LSH-MoE side by side, on an emulated 2-node cluster when permitted.

Two nodes x two ranks train the default GPT-MoE (16 sequences per rank) twice over: the baseline and
LSH-MoE, alternating blocks of steps inside the same processes, over a `tc tbf` limited link between
the nodes. It prints one table (step time, tokens/s, all-to-all bytes and share, compression rate,
speedup, its Amdahl bound, validation loss after the same tokens) and writes one plot
(`<out>/demo.png`: step-time breakdown and training loss per step). A few minutes on 2 cores, with a
progress line after every block of steps (steps done of total, each variant's compression rate and
speedup so far), and a closing line that says which training steps the compression rate was
measured over (the rate depends on the point of training).
Without root or iproute2 it says so and runs on loopback, where communication is nearly free.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lshmoe.bench.cluster import summarise, table
from lshmoe.bench.harness import ABSpec, add_ab_args, base_config, bench_parser, cluster_from, run_ab
from lshmoe.bench.variants import apply, parse_variant
from lshmoe.data import load_data


def _plot(rows: list[dict], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = {"compute": "#8fbc8f", "a2a": "#d9534f", "allreduce": "#5b8fd9", "other_comm": "#bbbbbb"}
    for i, r in enumerate(rows):
        bottom = 0.0
        for part, c in colors.items():
            h = 1000 * r["breakdown_s"][part]
            ax1.bar(i, h, bottom=bottom, color=c, label=part if i == 0 else None)
            bottom += h
    ax1.set_xticks(range(len(rows)), [f"{r['variant']}\n{r.get('speedup', 1):.2f}x" for r in rows])
    ax1.set(ylabel="median step time (ms)", title="where a step's time goes (ledger)")
    ax1.legend(fontsize=8)
    for name, v in result["variants"].items():
        ax2.plot(range(1, len(v["loss_curve"]) + 1), v["loss_curve"], label=name)
    ax2.set(xlabel="step", ylabel="training loss (rank 0)", title="same tokens, same data order")
    ax2.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")


WARMUP_ROUNDS = 1


def rate_note(rows: list[dict], rounds: int, steps_per_round: int) -> str:
    """Which compression rate the table shows, and at which point of training it was measured."""
    first, last = WARMUP_ROUNDS * steps_per_round + 1, (WARMUP_ROUNDS + rounds) * steps_per_round
    rates = [f"{r['variant']} sent {100 * r['compression_rate']:.1f}%" for r in rows if r["compression_rate"] < 1]
    where = f"training steps {first}-{last} of each variant, from a fresh initialisation"
    if not rates:
        return f"compression rate: every variant sent all routed rows ({where})"
    return (
        f"compression rate (rows sent / rows routed): {', '.join(rates)} of the routed rows, measured over {where}. "
        "The rate depends on the point of training (the activations change as the model trains); "
        "docs/lsh.md and docs/benchmarks.md give it for longer runs."
    )


def parser() -> argparse.ArgumentParser:
    p = bench_parser("lshmoe demo", __doc__, out=None, link="500mbit")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where demo.json and demo.png go")
    p.add_argument("--variants", default="baseline,lsh")
    return add_ab_args(p, rounds=8)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    cluster = cluster_from(a, "lshmoe demo", fallback=True)
    base = base_config(a.set)
    variants = dict(parse_variant(v) for v in a.variants.split(","))
    cfgs = {n: apply(base, o, cluster.world).to_dict() for n, o in variants.items()}
    load_data(base.data, print)
    where = cluster.where(links="link")
    print(f"training {', '.join(variants)} side by side on {where} ...", flush=True)
    out = a.out
    spec = ABSpec(cfgs, a.rounds, WARMUP_ROUNDS, a.steps_per_round, evaluate=True, progress=True)
    result = run_ab(spec, cluster)
    rows = summarise(result, cluster.world * base.train.batch_size * base.model.seq_len)
    print()
    print(table(rows))
    print(rate_note(rows, a.rounds, a.steps_per_round))
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps({"where": where, "rows": rows, "result": result}, indent=1))
    _plot(rows, result, out / "demo.png")
    print(f"\nplot: {out / 'demo.png'}   numbers: {out / 'demo.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
