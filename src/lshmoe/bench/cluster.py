"""Side-by-side speed on an emulated multi-node cluster: baseline vs LSH-MoE over real throttled links.

For every link rate: build the emulated cluster (N namespaces x R ranks, `tc tbf` on the inter-node
links), start the ranks in their namespaces, and let them alternate training steps between the
variants (`bench/ab_worker.py`). Per variant the report gives the median step time, tokens/s, the
ledger's all-to-all bytes per step, the interface byte counters against the ledger's inter-node
bytes, the all-to-all share f, the compression rate r (rows), the measured speedup over the baseline,
and the Amdahl bound 1 / ((1 - f) + f * b) from the baseline's f and the variant's byte ratio b (the
all-to-all time follows the bytes: b = r for LSH, bytes per row for FP8, both for lsh+fp8).

Run: `lshmoe bench cluster --links 10gbit,2gbit,1gbit,500mbit,200mbit` (root + iproute2), or
`--no-emulation` for the same comparison on loopback.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from lshmoe.bench.harness import ABSpec, add_ab_args, base_config, bench_parser, cluster_from, recorded_args, run_ab
from lshmoe.bench.netns import rate_bits
from lshmoe.bench.report import md_table, median, save_plot, write_section
from lshmoe.bench.simulate import amdahl_bound
from lshmoe.bench.variants import apply, parse_variant
from lshmoe.data import load_data


def summarise(result: dict, tokens_per_step: int, baseline: str = "baseline") -> list[dict]:
    """Per-variant medians, shares, compression, speedup and the Amdahl bound."""
    rows = []
    base = result["variants"].get(baseline)
    f_base = None
    if base:
        f_base = median([a / s for a, s in zip(base["a2a_time_s"], base["step_time_s"], strict=True)])
        t_base = median(base["step_time_s"])
        bytes_base = sum(base["a2a_bytes"]) / max(1, base["measured_steps"])
    for name, v in result["variants"].items():
        st = median(v["step_time_s"])
        n = max(1, v["measured_steps"])
        r = sum(v["rows_sent"]) / max(1.0, sum(v["rows_routed"]))
        ledger_inter = sum(v["inter_node_bytes"])
        row = {
            "variant": name,
            "step_s": st,
            "tokens_per_s": tokens_per_step / st,
            "a2a_bytes_per_step": sum(v["a2a_bytes"]) / n,
            "a2a_share": median([a / s for a, s in zip(v["a2a_time_s"], v["step_time_s"], strict=True)]),
            "allreduce_share": median([a / s for a, s in zip(v["allreduce_time_s"], v["step_time_s"], strict=True)]),
            "comm_share": median([c / s for c, s in zip(v["comm_time_s"], v["step_time_s"], strict=True)]),
            "compression_rate": r,
            "lsh_s": median(v["lsh_s"]),
            "iface_bytes_per_step": v["iface_tx_bytes"] / n,
            "ledger_inter_bytes_per_step": ledger_inter / n,
            "iface_over_ledger": v["iface_tx_bytes"] / ledger_inter if ledger_inter else None,
            "val_loss": v.get("val_loss"),
            "breakdown_s": {
                "a2a": median(v["a2a_time_s"]),
                "allreduce": median(v["allreduce_time_s"]),
                "other_comm": max(
                    0.0, median(v["comm_time_s"]) - median(v["a2a_time_s"]) - median(v["allreduce_time_s"])
                ),
                "compute": max(0.0, st - median(v["comm_time_s"])),
            },
        }
        if base:
            # the all-to-all time scales with its bytes: rows for LSH, bytes per row for FP8, both for lsh+fp8
            rb = row["a2a_bytes_per_step"] / bytes_base if bytes_base else r
            row["bytes_ratio"] = rb
            row["speedup"] = t_base / st
            row["amdahl_bound"] = amdahl_bound(f_base, rb)
            row["efficiency"] = row["speedup"] / row["amdahl_bound"]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    return md_table(
        [
            "variant",
            "step ms",
            "tokens/s",
            "a2a MB/step",
            "iface/ledger",
            "a2a share f",
            "comm share",
            "rate r",
            "LSH ms",
            "speedup",
            "Amdahl bound",
            "of bound",
            "val loss",
        ],
        [
            [
                r["variant"],
                1000 * r["step_s"],
                r["tokens_per_s"],
                r["a2a_bytes_per_step"] / 1e6,
                f"{r['iface_over_ledger']:.3f}" if r["iface_over_ledger"] else "-",
                f"{100 * r['a2a_share']:.0f}%",
                f"{100 * r['comm_share']:.0f}%",
                f"{100 * r['compression_rate']:.1f}%",
                1000 * r["lsh_s"],
                f"{r['speedup']:.2f}x" if "speedup" in r else "-",
                f"{r['amdahl_bound']:.2f}x" if "speedup" in r else "-",
                f"{100 * r['efficiency']:.0f}%" if "speedup" in r else "-",
                f"{r['val_loss']:.3f}" if r["val_loss"] is not None else "-",
            ]
            for r in rows
        ],
    )


def plot_breakdown(per_link: dict[str, list[dict]], out: Path, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = list(per_link)
    variants = [r["variant"] for r in per_link[links[0]]]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(links) * len(variants) / 2), 3.8))
    parts = ("compute", "a2a", "allreduce", "other_comm")
    colors = {"compute": "#8fbc8f", "a2a": "#d9534f", "allreduce": "#5b8fd9", "other_comm": "#bbbbbb"}
    x, labels = 0, []
    for link in links:
        for r in per_link[link]:
            bottom = 0.0
            for p in parts:
                h = 1000 * r["breakdown_s"][p]
                ax.bar(x, h, bottom=bottom, color=colors[p], label=p if x == 0 else None)
                bottom += h
            labels.append(f"{r['variant']}\n{link}")
            x += 1
        x += 0.5
    ticks = [i + 0.5 * (i // len(variants)) for i in range(len(labels))]
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_ylabel("median step time (ms)")
    ax.set_title("Step-time breakdown from the ledger")
    ax.legend(fontsize=8)
    return save_plot(fig, out, name)


def plot_speedup(per_link: dict[str, list[dict]], out: Path, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = sorted(per_link, key=rate_bits)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = [rate_bits(link) / 1e9 for link in links]
    for variant in [r["variant"] for r in per_link[links[0]] if "speedup" in r and r["variant"] != "baseline"]:
        meas = [next(r for r in per_link[link] if r["variant"] == variant)["speedup"] for link in links]
        bound = [next(r for r in per_link[link] if r["variant"] == variant)["amdahl_bound"] for link in links]
        (line,) = ax.plot(xs, meas, marker="o", label=f"{variant} measured")
        ax.plot(xs, bound, ls="--", color=line.get_color(), label=f"{variant} Amdahl bound")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xscale="log", xlabel="inter-node link (Gbit/s, tc tbf)", ylabel="step-time speedup vs baseline")
    ax.legend(fontsize=8)
    return save_plot(fig, out, name)


def parser() -> argparse.ArgumentParser:
    p = bench_parser(
        "lshmoe bench cluster", __doc__, name="cluster", link="10gbit,2gbit,1gbit,500mbit,200mbit", links=True
    )
    p.add_argument("--variants", default="baseline,lsh,lsh-comp")
    return add_ab_args(p, rounds=6)


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    cluster = cluster_from(a, "lshmoe bench cluster", hint=" for the unemulated comparison")
    emulate, world = cluster.emulate, cluster.world
    base = base_config(a.set)
    variants = dict(parse_variant(v) for v in a.variants.split(","))
    cfgs = {n: apply(base, o, world).to_dict() for n, o in variants.items()}
    load_data(base.data, print)
    links = a.links.split(",") if emulate else ["loopback"]
    tokens = world * base.train.batch_size * base.model.seq_len
    per_link, raw = {}, {}
    for link in links:
        print(f"== {link}: {a.nodes} nodes x {a.ranks_per_node} ranks, variants {', '.join(variants)}", flush=True)
        spec = ABSpec(cfgs, a.rounds, 1, a.steps_per_round, evaluate=False)
        res = run_ab(spec, replace(cluster, link=None if link == "loopback" else link))
        raw[link] = res
        per_link[link] = summarise(res, tokens)
        print(table(per_link[link]), flush=True)
    png_b = plot_breakdown(per_link, a.out, f"{a.name}_breakdown")
    png_s = plot_speedup(per_link, a.out, f"{a.name}_speedup") if emulate and len(links) > 1 else None
    body = [
        f"{a.nodes} emulated nodes x {a.ranks_per_node} gloo ranks "
        f"({'network namespaces, tc tbf on both directions of every inter-node link' if emulate else 'loopback'}),"
        f" default GPT-MoE with {base.train.batch_size} sequences/rank ({tokens} tokens/step); variants alternate"
        f" blocks of {a.steps_per_round} steps for {a.rounds} measured rounds after one warm-up round, medians of"
        " per-step values. a2a MB/step: ledger payload bytes on the wire (forward + backward, all ranks). "
        "iface/ledger: bytes counted by the nodes' link interfaces (TCP/IP headers and acks included) over the "
        "ledger's inter-node bytes. f: all-to-all time / step time. rate r: rows sent / rows routed. Amdahl "
        "bound: 1/((1-f)+f*b) with the baseline's f and b the variant's a2a bytes over the baseline's.\n"
    ]
    for link in links:
        body.append(f"### {link}\n\n{table(per_link[link])}\n")
    body.append(f"![breakdown]({png_b})\n")
    if png_s:
        body.append(f"![speedup vs link]({png_s})\n")
    write_section(
        a.out,
        a.name,
        "Emulated cluster: baseline vs LSH-MoE over throttled links",
        "\n".join(body),
        {"per_link": per_link, "raw": raw, "args": recorded_args(a)},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
