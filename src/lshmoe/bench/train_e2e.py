"""End-to-end training throughput of the reference GPT-MoE, with lshmoe's and DeepSpeed's MoE layer.

The same model (the default config: 4 blocks, D=128, MoE every 2nd block, 8 experts, top-2,
seq 128, 8 sequences per rank), the same data and the same trainer; only the MoE layer differs
(`--impl`). Runs alternate between implementations in rounds; each run reports its median step
time after warm-up, and the table gives the median over rounds as global training tokens/s.

Run: `lshmoe bench train` (DeepSpeed optional).
"""

from __future__ import annotations

import argparse
import os
import tempfile

from lshmoe.bench.deepspeed_moe import DeepSpeedMoE, have_deepspeed
from lshmoe.bench.report import md_table, median, print_table, save_plot, write_section
from lshmoe.config import Config, from_dict
from lshmoe.dist.spawn import run_ranks
from lshmoe.moe.layer import MoELayer
from lshmoe.train.data import load_data
from lshmoe.train.trainer import Trainer

IMPLS = {"lshmoe": MoELayer, "deepspeed": DeepSpeedMoE}


def _worker(comm, cfg_dict: dict, impl: str) -> dict:
    cfg = from_dict(cfg_dict)
    data = load_data(cfg.data)
    res = Trainer(cfg, comm, data, IMPLS[impl]).run()
    shares = [r["comm_share"] for r in res.records]
    a2a = [r["a2a_share"] for r in res.records]
    return {"median_step_s": res.median_step_time_s, "tokens_per_s": res.median_tokens_per_s,
            "comm_share": median(shares), "a2a_share": median(a2a), "val_loss": res.final_val_loss}


def _config(steps: int, capacity_factor: float | None, out_dir: str) -> dict:
    cfg = Config()
    cfg.train.steps, cfg.train.eval_every, cfg.train.log_every = steps, 0, 5
    cfg.train.progress, cfg.train.out_dir, cfg.train.eval_batches = False, out_dir, 2
    cfg.moe.capacity_factor = capacity_factor
    return cfg.to_dict()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lshmoe bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-deepspeed", action="store_true")
    a = p.parse_args(argv)
    variants = [("lshmoe", 1.25), ("lshmoe", None)]
    if have_deepspeed() and not a.no_deepspeed:
        variants.append(("deepspeed", 1.25))
    else:
        print("DeepSpeed not installed (pip install torch==2.13.0 deepspeed): measuring lshmoe only")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        load_data(from_dict(_config(1, None, tmp)).data, print)  # build the corpus once, outside the timing
        for w in [int(x) for x in a.worlds.split(",")]:
            got: dict[tuple, list[dict]] = {v: [] for v in variants}
            for rnd in range(a.rounds):
                order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
                for impl, cf in order:
                    out = run_ranks(_worker, w, _config(a.steps, cf, os.path.join(tmp, f"{impl}{w}{rnd}")), impl,
                                    timeout_s=300, threads=max(1, (os.cpu_count() or 1) // w))[0]
                    got[(impl, cf)].append(out)
            for (impl, cf), runs in got.items():
                rows.append({"world": w, "impl": impl, "capacity_factor": cf,
                             "tokens_per_s": median([r["tokens_per_s"] for r in runs]),
                             "median_step_s": median([r["median_step_s"] for r in runs]),
                             "comm_share": median([r["comm_share"] for r in runs]),
                             "a2a_share": median([r["a2a_share"] for r in runs]), "runs": runs})
            print_table(["W", "impl", "cf", "tokens/s", "step ms", "comm share (ledger)"],
                        [[r["world"], r["impl"], r["capacity_factor"], r["tokens_per_s"], 1000 * r["median_step_s"],
                          r["comm_share"]] for r in rows if r["world"] == w])
    for r in rows:
        ds = next((x for x in rows if x["world"] == r["world"] and x["impl"] == "deepspeed"), None)
        r["vs_deepspeed"] = r["tokens_per_s"] / ds["tokens_per_s"] if ds else None
    png = _plot(rows)
    table = md_table(
        ["W", "MoE layer", "capacity factor", "tokens/s", "median step ms", "comm share*", "vs DeepSpeed"],
        [[r["world"], r["impl"], r["capacity_factor"] or "dropless", r["tokens_per_s"], 1000 * r["median_step_s"],
          f"{100 * r['comm_share']:.0f}%" if r["impl"] == "lshmoe" else "n/a",
          f"{r['vs_deepspeed']:.2f}x" if r["vs_deepspeed"] else "-"] for r in rows])
    body = (f"Reference GPT-MoE (default config), {a.steps} steps per run, {a.rounds} alternating rounds, median of "
            f"per-run median step times; W gloo ranks on this machine's cores, EP = W.\n\n{table}\n\n"
            "*comm share from lshmoe's ledger (all-to-all + gradient all-reduce time / step time); DeepSpeed's "
            "collectives bypass the ledger.\n\n"
            f"![train e2e]({png})\n")
    write_section("train_e2e", "End-to-end training throughput (CPU, gloo)", body, {"rows": rows})
    return 0


def _plot(rows: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    labels = sorted({(r["impl"], r["capacity_factor"] or 0) for r in rows})
    worlds = sorted({r["world"] for r in rows})
    width = 0.8 / len(labels)
    for i, (impl, cf) in enumerate(labels):
        ys = [next((r["tokens_per_s"] for r in rows if r["world"] == w and r["impl"] == impl
                    and (r["capacity_factor"] or 0) == cf), 0) for w in worlds]
        ax.bar([j + i * width for j in range(len(worlds))], ys, width,
               label=f"{impl} ({'dropless' if not cf else f'cf {cf}'})")
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(worlds))], [f"W={w}" for w in worlds])
    ax.set_ylabel("training tokens/s (all ranks)")
    ax.set_title("GPT-MoE end-to-end training")
    ax.legend(fontsize=8)
    return save_plot(fig, "train_e2e")
