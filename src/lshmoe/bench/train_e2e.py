"""End-to-end training throughput of the reference GPT-MoE, with lshmoe's and DeepSpeed's MoE layer.

The same model (the default config: 4 blocks, D=128, MoE every 2nd block, 8 experts, top-2, seq 128,
8 sequences per rank), the same data and the same trainer; only the MoE layer differs. All variants
train in the same W rank processes (gloo, loopback), alternating blocks of steps with the order
rotating every round (`bench/ab_worker.py`), so they share the machine's state; the table gives
median step times after a warm-up round as global training tokens/s.

Run: `lshmoe bench train` (DeepSpeed optional: `pip install torch==2.13.0 deepspeed`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lshmoe.bench.cluster import summarise
from lshmoe.bench.deepspeed_moe import have_deepspeed
from lshmoe.bench.harness import ABSpec, Cluster, add_ab_args, bench_parser, run_ab
from lshmoe.bench.report import bar_groups, md_table, print_table, save_plot, write_section
from lshmoe.config import Config
from lshmoe.data import load_data


def _config(capacity_factor: float | None) -> dict:
    cfg = Config()
    cfg.train.progress, cfg.train.eval_batches = False, 2
    cfg.moe.capacity_factor = capacity_factor
    return cfg.to_dict()


def parser() -> argparse.ArgumentParser:
    p = bench_parser("lshmoe bench train", __doc__, cluster=False)
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--no-deepspeed", action="store_true")
    return add_ab_args(p, rounds=6)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    variants = {"lshmoe cf=1.25": _config(1.25), "lshmoe dropless": _config(None)}
    impls = {}
    if have_deepspeed() and not a.no_deepspeed:
        variants["deepspeed cf=1.25"] = _config(1.25)
        impls["deepspeed cf=1.25"] = "deepspeed"
    else:
        print("DeepSpeed not installed (pip install torch==2.13.0 deepspeed): measuring lshmoe only")
    load_data(Config().data, print)
    rows = []
    tokens_rank = Config().train.batch_size * Config().model.seq_len
    for w in [int(x) for x in a.worlds.split(",")]:
        spec = ABSpec(variants, a.rounds, 1, a.steps_per_round, evaluate=False, impls=impls)
        res = run_ab(spec, Cluster(nodes=1, ranks_per_node=w))
        for r in summarise(res, w * tokens_rank, baseline="deepspeed cf=1.25" if impls else "lshmoe cf=1.25"):
            rows.append({"world": w, **r})
        print_table(
            ["W", "variant", "tokens/s", "step ms", "vs DeepSpeed"],
            [
                [w, r["variant"], r["tokens_per_s"], 1000 * r["step_s"], f"{r.get('speedup', 1):.2f}x"]
                for r in rows
                if r["world"] == w
            ],
        )
    png = _plot(rows, a.out)
    table = md_table(
        ["W", "MoE layer", "tokens/s", "median step ms", "comm share (ledger)*", "vs DeepSpeed"],
        [
            [
                r["world"],
                r["variant"],
                r["tokens_per_s"],
                1000 * r["step_s"],
                f"{100 * r['comm_share']:.0f}%" if "lshmoe" in r["variant"] else "n/a",
                f"{r['speedup']:.2f}x" if impls else "-",
            ]
            for r in rows
        ],
    )
    body = (
        f"Reference GPT-MoE (default config, {tokens_rank} tokens per rank per step), W gloo ranks on this "
        f"machine's cores (EP = W); variants alternate blocks of {a.steps_per_round} steps in the same "
        f"processes for {a.rounds} measured rounds after a warm-up round; medians of per-step times (slowest "
        f"rank).\n\n{table}\n\n*lshmoe's ledger: all-to-all + gradient all-reduce time / step time; DeepSpeed's "
        f"collectives bypass the ledger.\n\n![train e2e]({png})\n"
    )
    write_section(a.out, "train_e2e", "End-to-end training throughput (CPU, gloo)", body, {"rows": rows})
    return 0


def _plot(rows: list[dict], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    bar_groups(
        ax,
        sorted({r["world"] for r in rows}),
        sorted({r["variant"] for r in rows}),
        lambda w, name: next((r["tokens_per_s"] for r in rows if r["world"] == w and r["variant"] == name), 0),
        lambda w: f"W={w}",
    )
    ax.set_ylabel("training tokens/s (all ranks)")
    ax.set_title("GPT-MoE end-to-end training")
    ax.legend(fontsize=8)
    return save_plot(fig, out, "train_e2e")
