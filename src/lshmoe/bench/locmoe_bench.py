"""LocMoE on the emulated cluster: inter-node bytes, load balance, step time and loss versus mu.

Every (variant, seed) is a full training job on N emulated nodes x R ranks (routing needs training to
move towards the node-local experts), run back to back. From each job's metrics, averaged over the
last quarter of training: inter-node and intra-node bytes per step (ledger, with the topology map),
the fraction of routed rows that stay on their node, expert load max/mean and coefficient of variation,
step time and the final validation loss (mean +- std over seeds).

The failure mode of the paper (LocMoE "is more appropriate when #experts > #nodes") is reproduced
with 4 nodes x 1 rank: with one expert per node the locality loss can only be satisfied by sending
every token to its single local expert, against the balance loss.

The capacity lower bound (Theorem 1) is computed from the trained model of one run: the median cosine
delta between tokens and their expert's gate vector gives p_delta and ec_min, reported beside the
capacity actually used (dropless: the measured max/mean load).

Run: `lshmoe bench locmoe` (root + iproute2; `--no-emulation` runs the same topology on loopback).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from lshmoe.bench.harness import base_config, bench_parser, cluster_from, recorded_args, run_training
from lshmoe.bench.report import md_table, save_plot, write_section
from lshmoe.bench.variants import apply
from lshmoe.config import Config
from lshmoe.data import load_data
from lshmoe.distributed.comm import Comm
from lshmoe.models.gpt import GPTMoE
from lshmoe.moe.layer import MoELayer
from lshmoe.moe.locality import capacity_lower_bound, measured_delta
from lshmoe.train import checkpoint as ckpt


def _tail_mean(recs: list[dict], key: str) -> float:
    train = [r for r in recs if r["kind"] == "train"]
    tail = train[-max(1, len(train) // 4) :]
    return statistics.mean(r[key] for r in tail)


def _layer_mean(recs: list[dict], key: str) -> float:
    train = [r for r in recs if r["kind"] == "train"]
    tail = train[-max(1, len(train) // 4) :]
    vals = [v for r in tail for v in (r[key].values() if isinstance(r[key], dict) else [r[key]])]
    return statistics.mean(vals)


def _local_fraction(recs: list[dict]) -> float:
    train = [r for r in recs if r["kind"] == "train"]
    tail = train[-max(1, len(train) // 4) :]
    vals = [
        lay["rows_local"] / lay["rows_routed"]
        for r in tail
        for lay in r["layers"].values()
        if lay.get("rows_routed") and "rows_local" in lay
    ]
    return statistics.mean(vals) if vals else 1.0


def summarise_run(recs: list[dict]) -> dict:
    return {
        "inter_mb": _tail_mean(recs, "inter_node_bytes") / 1e6,
        "intra_mb": _tail_mean(recs, "intra_node_bytes") / 1e6,
        "local_fraction": _local_fraction(recs),
        "load_max_mean": _layer_mean(recs, "load_max_over_mean"),
        "load_cv": _layer_mean(recs, "load_cv"),
        "step_s": _tail_mean(recs, "step_time_s"),
        "val": [r for r in recs if r["kind"] == "eval"][-1]["val_loss"],
    }


def capacity_report(cfg: Config, ckpt_path: Path) -> list[dict]:
    """Theorem 1's bound from a trained checkpoint (loaded on one rank), per MoE layer."""
    data = load_data(cfg.data)
    comm = Comm.local()
    model = GPTMoE(cfg.model, cfg.moe, data.vocab_size, comm, settings=cfg, seed=cfg.train.seed)
    opt = torch.optim.AdamW(model.parameters())
    entries = ckpt.state_entries(model, opt, 0, {})
    ckpt.load(ckpt_path, {k: v for k, v in entries.items() if k.startswith("model/")})
    model.eval()
    grabbed: dict[int, list] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, args, out: grabbed.setdefault(mod.layer_id, []).append(
                args[0].reshape(-1, args[0].shape[-1]).detach()
            )
        )
        for m in model.modules()
        if isinstance(m, MoELayer)
    ]
    with torch.no_grad():
        for i in range(4):
            x, y = data.val_batch(i, 0, 1, cfg.train.batch_size, cfg.model.seq_len, torch.device("cpu"), 4)
            model(x, y)
    for h in hooks:
        h.remove()
    rows = []
    for layer in (m for m in model.modules() if isinstance(m, MoELayer)):
        x = torch.cat(grabbed[layer.layer_id])
        chosen = layer.router(x).topk_ids_TK[:, 0]
        delta = measured_delta(x, layer.router.gate_vectors(), chosen)
        p, ec = capacity_lower_bound(max(delta, 0.0), cfg.model.d_model, cfg.moe.num_experts)
        load = torch.bincount(chosen, minlength=cfg.moe.num_experts).double()
        rows.append(
            {
                "layer": layer.layer_id,
                "delta": delta,
                "p_delta": p,
                "ec_min": ec,
                "used_max_over_mean": float(load.max() / load.mean()),
            }
        )
    return rows


def parser() -> argparse.ArgumentParser:
    p = bench_parser("lshmoe bench locmoe", __doc__, name="locmoe", link="1gbit")
    p.add_argument("--mus", default="0,0.001,0.01,0.1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--router", default="topk", help="topk (learnable gate) or locmoe (GrAP)")
    p.add_argument("--with-lsh", default="0,0.01", help="mus also run with LSH-MoE compression")
    p.add_argument("--with-node-bias", default="", help="mus also run with a per-node router bias (moe.node_bias)")
    p.add_argument("--failure-seeds", default="0,1,2", help="seeds of the failure scenario ('' = skip it)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    cluster = cluster_from(a, "lshmoe bench locmoe")
    base = base_config(
        [
            f"train.steps={a.steps}",
            "train.eval_every=50",
            "train.log_every=10",
            "train.batch_size=8",
            f"moe.router={a.router}",
            *a.set,
        ]
    )
    load_data(base.data, print)
    seeds = [int(s) for s in a.seeds.split(",")]
    lsh_mus = {float(m) for m in a.with_lsh.split(",") if m}
    nb_mus = [m for m in a.with_node_bias.split(",") if m]
    variants = [(f"mu={m}", {"moe.locality_weight": m}) for m in a.mus.split(",")]
    variants += [
        (f"mu={m}+lsh", {"moe.locality_weight": m, "moe.compress": "lsh"})
        for m in a.mus.split(",")
        if float(m) in lsh_mus
    ]
    variants += [(f"mu={m}+node-bias", {"moe.locality_weight": m, "moe.node_bias": "true"}) for m in nb_mus]
    failure = [(f"E=4,mu={m}", {"moe.num_experts": "4", "moe.locality_weight": m}) for m in ("0", "0.1")]
    failure += [("E=8,mu=0.1", {"moe.locality_weight": "0.1"})]
    results: dict[str, dict] = {}
    cap_rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lshmoe-locmoe-") as tmp:
        failure_seeds = [int(s) for s in a.failure_seeds.split(",") if s]
        # the failure scenario is one expert per node: 4 nodes x 1 rank
        failing = replace(cluster, nodes=4, ranks_per_node=1)
        scenarios = (("main", cluster, variants, seeds), ("failure", failing, failure, failure_seeds))
        for scenario, topo, vs, ss in scenarios:
            for seed in ss:
                for name, over in vs:
                    cfg = apply(
                        base,
                        {
                            **{k: str(v) for k, v in over.items()},
                            "train.seed": str(seed),
                            "train.save_every": str(a.steps),
                        },
                        topo.world,
                    )
                    out = Path(tmp) / f"{scenario}-{name}-{seed}"
                    print(f"== {scenario} {name} seed {seed}", flush=True)
                    recs = run_training(cfg, topo, out)
                    entry = {"nodes": topo.nodes, "rpn": topo.ranks_per_node, "runs": []}
                    results.setdefault(f"{scenario}/{name}", entry)["runs"].append(summarise_run(recs))
                    if scenario == "main" and seed == seeds[0] and name == "mu=0.01":
                        cap_rows = capacity_report(cfg, ckpt.latest(out / "checkpoints"))
    rows = []
    for key, res in results.items():
        runs = res["runs"]
        agg = {k: statistics.mean(r[k] for r in runs) for k in runs[0] if k != "val"}
        vals = [r["val"] for r in runs]
        rows.append(
            {
                "variant": key,
                **agg,
                "val_mean": statistics.mean(vals),
                "val_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "seeds": len(runs),
            }
        )
    for r in rows:
        scen = r["variant"].split("/")[0]
        ref = next((x for x in rows if x["variant"] in (f"{scen}/mu=0", f"{scen}/E=4,mu=0")), None)
        r["inter_vs_mu0"] = r["inter_mb"] / ref["inter_mb"] - 1 if ref and ref["inter_mb"] else 0.0
        r["val_vs_mu0"] = r["val_mean"] / ref["val_mean"] - 1 if ref else 0.0
    tbl = md_table(
        [
            "variant",
            "seeds",
            "inter-node MB/step",
            "vs mu=0",
            "intra-node MB/step",
            "rows on own node",
            "load max/mean",
            "load CV",
            "step ms",
            "val loss",
            "vs mu=0",
        ],
        [
            [
                r["variant"],
                r["seeds"],
                r["inter_mb"],
                f"{100 * r['inter_vs_mu0']:+.0f}%",
                r["intra_mb"],
                f"{100 * r['local_fraction']:.0f}%",
                r["load_max_mean"],
                r["load_cv"],
                1000 * r["step_s"],
                f"{r['val_mean']:.4f} ± {r['val_std']:.4f}",
                f"{100 * r['val_vs_mu0']:+.2f}%",
            ]
            for r in rows
        ],
    )
    ctbl = md_table(
        ["layer", "measured delta (median cos)", "p_delta", "ec_min (Theorem 1)", "capacity used: max/mean load"],
        [[c["layer"], c["delta"], c["p_delta"], c["ec_min"], c["used_max_over_mean"]] for c in cap_rows],
    )
    print(tbl)
    print(ctbl)
    png = _plot(rows, a.out, a.name)
    where = "emulated nodes (network namespaces, tc tbf " + a.link + ")" if cluster.emulate else "loopback"
    body = (
        f"Router `{a.router}` + locality loss weight mu; main scenario {a.nodes} nodes x {a.ranks_per_node} "
        f"ranks, failure scenario 4 nodes x 1 rank; {where}; {a.steps} steps, 8 sequences/rank; per-run values "
        "are means over the last quarter of training, then means over seeds. Bytes are the ledger's per step "
        "summed over ranks (all collectives, forward and backward).\n\n"
        f"{tbl}\n\n![locmoe]({png})\n\n### Capacity lower bound (Theorem 1) on the trained mu=0.01 model\n\n"
        f"{ctbl}\n"
    )
    title = "LocMoE: locality-aware routing on emulated nodes" + ("" if a.name == "locmoe" else f" ({a.name})")
    write_section(a.out, a.name, title, body, {"rows": rows, "capacity": cap_rows, "args": recorded_args(a)})
    return 0


def _plot(rows: list[dict], out: Path, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r["variant"].startswith("main/") and "+" not in r["variant"]]
    xs = [float(r["variant"].split("mu=")[1]) for r in main]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    pos = [max(x, 1e-4) for x in xs]
    ax1.plot(pos, [r["inter_mb"] for r in main], marker="o")
    ax1.set(
        xscale="log", xlabel="mu (0 plotted at 1e-4)", ylabel="inter-node MB / step", title="bytes on the slow link"
    )
    ax2.errorbar(pos, [r["val_mean"] for r in main], yerr=[r["val_std"] for r in main], marker="o")
    ax2.set(xscale="log", xlabel="mu", ylabel="validation loss", title="quality")
    for tag, marker in (("+lsh", "s"), ("+node-bias", "^")):
        extra = [r for r in rows if r["variant"].startswith("main/") and r["variant"].endswith(tag)]
        if extra:
            ex = [max(float(r["variant"].split("mu=")[1].split("+")[0]), 1e-4) for r in extra]
            ax1.plot(ex, [r["inter_mb"] for r in extra], marker=marker, linestyle="none", label=tag[1:])
            ax2.plot(ex, [r["val_mean"] for r in extra], marker=marker, linestyle="none", label=tag[1:])
    if any(r["variant"].startswith("main/") and "+" in r["variant"] for r in rows):
        ax1.legend(fontsize=8)
    return save_plot(fig, out, name)


if __name__ == "__main__":
    raise SystemExit(main())
