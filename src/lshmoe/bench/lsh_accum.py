"""LSH-MoE's compression rate against gradient accumulation: the same step batch split into N
micro-batches, so each compressed dispatch hashes N times fewer rows per (source rank, expert) group.

The default GPT-MoE with `--compress lsh` (the bench's 16 sequences per rank) first trains `--warm`
steps in one micro-batch on loopback ranks, saving a checkpoint at each step of `--at`. From each
checkpoint, for each N of `--accums`, `lshmoe train --resume CKPT --grad-accum N` then trains `--steps`
more steps: the same weights and the same batches (the data order is a function of the step), so the
only change is N. Reported per (checkpoint, N): the compression rate (rows sent / rows routed, over the
ranks and MoE layers, and per layer), the mean rows of one (source rank, expert) group in one
micro-batch, and the all-to-all bytes per step.

Run: `lshmoe bench lsh-accum --out docs/bench`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from lshmoe.bench.harness import Cluster, base_config, bench_parser, recorded_args, run_training
from lshmoe.bench.report import md_table, save_plot, write_section
from lshmoe.config import Config, from_dict
from lshmoe.data import load_data


def _warm(base: Config, cluster: Cluster, work: Path, at: list[int]) -> dict[int, Path]:
    """Train to max(at) in one micro-batch, keeping a checkpoint at each step of `at`."""
    cfg = from_dict(base.to_dict())
    cfg.train.steps, cfg.train.grad_accum = max(at), 1
    cfg.train.save_every, cfg.train.keep_last = _gcd(at), 0
    cfg.train.log_every, cfg.train.eval_every = _gcd(at), 0
    run_training(cfg, cluster, work / "warm")
    ckpts = {s: work / "warm" / "checkpoints" / f"step_{s:08d}" for s in at}
    missing = [str(p) for p in ckpts.values() if not p.is_dir()]
    if missing:
        raise RuntimeError(f"the warm-up run left no checkpoint {missing[0]}")
    return ckpts


def _gcd(xs: list[int]) -> int:
    import math

    return math.gcd(*xs)


def _measure(base: Config, cluster: Cluster, work: Path, ckpt: Path, start: int, n: int, steps: int) -> dict[str, Any]:
    cfg = from_dict(base.to_dict())
    cfg.train.resume, cfg.train.grad_accum = str(ckpt), n
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_every, cfg.train.save_every = start + steps, steps, 0, 0
    recs = run_training(cfg, cluster, work / f"from{start}-n{n}")
    rec = [r for r in recs if r["kind"] == "train"][-1]
    layers = {k: v["compression_rate"] for k, v in rec["layers"].items() if "compression_rate" in v}
    moe = len(rec["layers"]) or 1
    group = rec["rows_routed"] / (cluster.world * moe * base.moe.num_experts * n)
    return {
        "from_step": start,
        "grad_accum": n,
        "micro_batch": base.train.batch_size // n,
        "rate": rec["compression_rate"],
        "layer_rates": layers,
        "rows_routed": rec["rows_routed"],
        "rows_sent": rec["rows_sent"],
        "rows_per_group": group,
        "a2a_bytes": rec["a2a_bytes"],
        "tokens_per_s": rec["tokens_per_s"],
    }


def parser() -> argparse.ArgumentParser:
    p = bench_parser("lshmoe bench lsh-accum", __doc__, cluster=False, name="lsh_accum")
    p.add_argument("--nproc", type=int, default=2, help="ranks on loopback [default: 2]")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config overrides")
    p.add_argument("--accums", default="1,2,4,8", help="micro-batches per step N [default: 1,2,4,8]")
    p.add_argument("--at", default="100,400", help="checkpoints (training steps) measured from [default: 100,400]")
    p.add_argument("--steps", type=int, default=10, help="steps measured from each checkpoint [default: 10]")
    p.add_argument("--from-json", metavar="PATH", help="re-render the report of a recorded run (its JSON)")
    return p


def _base(sets: list[str]) -> Config:
    base = base_config(["moe.compress=lsh", *sets])
    base.train.eval_batches, base.train.resume = 1, "none"
    return base


def main(argv: list[str] | None = None) -> int:
    from lshmoe.errors import UserError

    a = parser().parse_args(argv)
    if a.from_json:
        import json

        rec = json.loads(Path(a.from_json).read_text())
        args = rec["args"]
        cluster = Cluster(nodes=1, ranks_per_node=args["nproc"])
        report(a.out, a.name, rec["rows"], _base(args["set"]), cluster, args, rec["command"], rec["machine"])
        return 0
    cluster = Cluster(nodes=1, ranks_per_node=a.nproc)
    base = _base(a.set)
    accums = [int(x) for x in a.accums.split(",") if x.strip()]
    at = sorted(int(x) for x in a.at.split(",") if x.strip())
    bad = [n for n in accums if n < 1 or base.train.batch_size % n]
    if bad:
        raise UserError(f"--accums {bad[0]}: each N must divide train.batch_size={base.train.batch_size}")
    load_data(base.data, print)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lshmoe-lsh-accum-") as tmp:
        ckpts = _warm(base, cluster, Path(tmp), at)
        for start in at:
            for n in accums:
                print(f"== from step {start}, {n} micro-batch(es)", flush=True)
                rows.append(_measure(base, cluster, Path(tmp), ckpts[start], start, n, a.steps))
                print(f"   rate {100 * rows[-1]['rate']:.1f}%", flush=True)
    report(a.out, a.name, rows, base, cluster, recorded_args(a))
    return 0


def report(
    out: Path,
    name: str,
    rows: list[dict],
    base: Config,
    cluster: Cluster,
    args: dict,
    command: str | None = None,
    meta: dict | None = None,
) -> None:
    layer_names = sorted({k for r in rows for k in r["layer_rates"]})
    headers = ["from step", "N", "seqs per micro-batch", "rows per (rank, expert) group", "rate (all layers)"]
    headers += [f"{k} rate" for k in layer_names] + ["a2a MB/step", "rate vs N=1"]
    ref = {r["from_step"]: r["rate"] for r in rows if r["grad_accum"] == 1}
    table = [
        [
            r["from_step"],
            r["grad_accum"],
            r["micro_batch"],
            f"{r['rows_per_group']:.0f}",
            f"{100 * r['rate']:.1f}%",
            *(f"{100 * r['layer_rates'].get(k, float('nan')):.1f}%" for k in layer_names),
            f"{r['a2a_bytes'] / 2**20:.2f}",
            f"{r['rate'] / ref[r['from_step']]:.2f}x" if r["from_step"] in ref else "-",
        ]
        for r in rows
    ]
    tbl = md_table(headers, table)
    print(tbl)
    png = _plot(rows, out, name)
    m, e, lsh = base.model, base.moe, base.lsh
    body = f"""
The default GPT-MoE (d_model {m.d_model}, {m.n_layers} layers, MoE every {m.moe_every}, {e.num_experts} experts,
top-{e.top_k}) with `--compress lsh` (family {lsh.family}, b = {lsh.buckets_per_hash}, L = {lsh.num_hashes}),
{cluster.world} ranks on loopback, {base.train.batch_size} sequences of {m.seq_len} tokens per rank per step. A
warm-up run trains in one micro-batch and saves checkpoints; from each, `--grad-accum N` trains {args["steps"]}
more steps on the same batches, so only the micro-batch size changes. Rate = rows sent / rows routed over the
ranks and MoE layers of those steps; rows per group = the mean rows one source rank routes to one expert in one
micro-batch (T·K/E per micro-batch); a2a MB/step: all-to-all bytes on the wire per step, summed over the ranks.
Each measured run is `lshmoe train --compress lsh --batch-size {base.train.batch_size} --nproc {cluster.world}
--resume <warm-up checkpoint at step S> --grad-accum N --steps S+{args["steps"]}` (the bench's config otherwise).
Machine conditions: 2 cores shared with other jobs; rows and rates do not depend on them, and no time is reported.

{tbl}

![rate vs micro-batches]({png})

{_finding(rows)}
"""
    title = "LSH-MoE compression rate vs gradient accumulation (micro-batches)"
    write_section(out, name, title, body, {"rows": rows, "args": args}, command=command, meta=meta)


def _finding(rows: list[dict]) -> str:
    """What the table shows, per checkpoint: the rate at the smallest and the largest N."""
    parts = []
    for start in sorted({r["from_step"] for r in rows}):
        rs = sorted((r for r in rows if r["from_step"] == start), key=lambda r: r["grad_accum"])
        lo, hi = rs[0], rs[-1]
        rising = all(b["rate"] >= a["rate"] for a, b in zip(rs, rs[1:], strict=False))
        parts.append(
            f"from step {start} the rate goes from {100 * lo['rate']:.1f}% at N = {lo['grad_accum']} "
            f"({lo['rows_per_group']:.0f} rows per group) to {100 * hi['rate']:.1f}% at N = {hi['grad_accum']} "
            f"({hi['rows_per_group']:.0f} rows per group), {hi['rate'] / lo['rate']:.2f}x"
            + (", rising with every halving of the micro-batch" if rising else ", not monotonically")
        )
    return "Measured: " + "; ".join(parts) + "."


def _plot(rows: list[dict], out: Path, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for start in sorted({r["from_step"] for r in rows}):
        rs = [r for r in rows if r["from_step"] == start]
        ax.plot([r["rows_per_group"] for r in rs], [100 * r["rate"] for r in rs], "o-", label=f"from step {start}")
        for r in rs:
            ax.annotate(f"N={r['grad_accum']}", (r["rows_per_group"], 100 * r["rate"]), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="rows per (source rank, expert) group per micro-batch", ylabel="compression rate (%)")
    ax.legend(fontsize=8)
    return save_plot(fig, out, name)


if __name__ == "__main__":
    raise SystemExit(main())
