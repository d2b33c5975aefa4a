"""ScMoE on the emulated cluster: how much all-to-all time each architecture leaves exposed.

Variants (each alone and with LSH-MoE compression): top-2 MoE, the shared-expert MoE (shared dense
expert + top-1), and ScMoE with the shortcut at Pos-1, Pos-2 and Pos-3 (top-1 + shared expert, CG-1),
plus DGMoE. All train in the same rank processes on 2 emulated nodes x 2 ranks (default), alternating blocks of
steps (`bench/ab_worker.py`); the first round is the ScMoE warm-up in which op and all-to-all times are
measured and the expert slot is chosen (the paper's Eq. 11).

Exposed all-to-all time is measured, not subtracted: the ledger records how long the rank was blocked
waiting for each all-to-all (for an asynchronous one, the time spent in its wait). The report gives
per variant the step time, the all-to-all time (issue to completion), the exposed part and its
fraction, and the step-time speedup over top-2. Validation loss at equal tokens comes from
`lshmoe bench quality --variants top2,shared,scmoe-pos1,scmoe-pos2,scmoe-pos3,dgmoe --name scmoe_quality`.

Run: `lshmoe bench scmoe --link 500mbit`.
"""

from __future__ import annotations

import argparse

from lshmoe.bench.cluster import plot_breakdown, summarise
from lshmoe.bench.harness import ABSpec, add_ab_args, base_config, bench_parser, cluster_from, recorded_args, run_ab
from lshmoe.bench.report import md_table, median, write_section
from lshmoe.bench.variants import apply, parse_variant
from lshmoe.data import load_data

DEFAULT = (
    "top2,top2+lsh,shared,shared+lsh,scmoe-pos1,scmoe-pos1+lsh,scmoe-pos2,scmoe-pos2+lsh,scmoe-pos3,"
    "scmoe-pos3+lsh,dgmoe"
)


def parser() -> argparse.ArgumentParser:
    p = bench_parser("lshmoe bench scmoe", __doc__, link="500mbit")
    p.add_argument("--variants", default=DEFAULT)
    return add_ab_args(p, rounds=5)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    cluster = cluster_from(a, "lshmoe bench scmoe")
    base = base_config([f"model.slot_warmup={a.steps_per_round}", *a.set])
    variants = dict(parse_variant(v) for v in a.variants.split(","))
    cfgs = {n: apply(base, o, cluster.world).to_dict() for n, o in variants.items()}
    load_data(base.data, print)
    res = run_ab(ABSpec(cfgs, a.rounds, 1, a.steps_per_round, evaluate=False), cluster)
    rows = summarise(res, cluster.world * base.train.batch_size * base.model.seq_len, baseline="top2")
    for r in rows:
        v = res["variants"][r["variant"]]
        r["a2a_s"] = median(v["a2a_time_s"])
        r["a2a_exposed_s"] = median(v["a2a_exposed_s"])
        r["exposed_frac"] = r["a2a_exposed_s"] / r["a2a_s"] if r["a2a_s"] else 0.0
    tbl = md_table(
        [
            "variant",
            "step ms",
            "tokens/s",
            "a2a MB/step",
            "a2a ms (issue->done)",
            "a2a ms exposed",
            "exposed / a2a",
            "comm share",
            "rate r",
            "speedup vs top-2",
        ],
        [
            [
                r["variant"],
                1000 * r["step_s"],
                r["tokens_per_s"],
                r["a2a_bytes_per_step"] / 1e6,
                1000 * r["a2a_s"],
                1000 * r["a2a_exposed_s"],
                f"{100 * r['exposed_frac']:.0f}%",
                f"{100 * r['comm_share']:.0f}%",
                f"{100 * r['compression_rate']:.0f}%",
                f"{r['speedup']:.2f}x",
            ]
            for r in rows
        ],
    )
    print(tbl)
    png = plot_breakdown({a.link if cluster.emulate else "loopback": rows}, a.out, "scmoe_breakdown")
    where = cluster.where()
    body = (
        f"{where}; default model (4 blocks, D=128, 8 experts, MoE in blocks 1 and 3, so each ScMoE pair is "
        f"blocks 0-1 and 2-3), {base.train.batch_size} sequences/rank; {a.rounds} measured rounds of "
        f"{a.steps_per_round} steps per variant after a warm-up round (in which ScMoE measures op times and "
        "picks its expert slot by Eq. 11). Exposed = time blocked in all-to-all waits (ledger); a2a ms = "
        "issue to completion, summed over the step's all-to-alls.\n\n"
        f"{tbl}\n\n![breakdown]({png})\n"
    )
    title = "ScMoE / DGMoE: overlap of the all-to-all with dense work"
    write_section(a.out, "scmoe", title, body, {"rows": rows, "raw": res, "args": recorded_args(a)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
