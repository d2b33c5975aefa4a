"""MoE-layer forward+backward throughput: lshmoe vs DeepSpeed's `deepspeed.moe.layer.MoE`.

Both layers run in the same spawned gloo ranks on the same shapes (T tokens per rank, width D,
expert hidden F, E experts sharded over W ranks, top-k K, GeLU FFN experts), with the same capacity
factor; lshmoe is also measured dropless. Repetitions interleave the implementations (the order
rotates every repetition) and each repetition's time is the slowest rank's; the table reports
medians as global tokens per second (W * T / time).

Run: `lshmoe bench layer` (DeepSpeed is optional: `pip install torch==2.13.0 deepspeed`).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from lshmoe.bench.deepspeed_moe import DeepSpeedMoE, have_deepspeed
from lshmoe.bench.harness import bench_parser
from lshmoe.bench.report import bar_groups, md_table, median, print_table, save_plot, write_section
from lshmoe.config import MoEConfig
from lshmoe.moe.layer import MoELayer
from lshmoe.testing import run_ranks


def _gelu_moe() -> MoEConfig:
    return MoEConfig(num_experts=8, top_k=2, d_expert=1024, activation="gelu", capacity_factor=1.25)


@dataclass(kw_only=True)
class LayerSpec:
    """The measured layer (E, K, F, capacity factor: `moe`) at width `d_model` on `tokens` rows per rank."""

    moe: MoEConfig = field(default_factory=_gelu_moe)
    tokens: int = 2048
    d_model: int = 256
    reps: int = 7
    iters: int = 2
    warmup: int = 2

    def record(self) -> dict:
        """The flat record of the report's JSON."""
        shape = {k: getattr(self.moe, k) for k in ("d_expert", "num_experts", "top_k", "capacity_factor")}
        timing = {"reps": self.reps, "iters": self.iters, "warmup": self.warmup}
        return {"tokens": self.tokens, "d_model": self.d_model, **shape, **timing}


def _fwd_bwd(layer: nn.Module, x: torch.Tensor) -> None:
    out = layer(x)
    y = out.y_TD if hasattr(out, "y_TD") else out[0]
    y.square().mean().backward()


def _worker(comm, spec: LayerSpec, with_ds: bool) -> dict[str, list[float]]:
    torch.manual_seed(comm.rank)
    layers: dict[str, nn.Module] = {}
    for name, cf in (("lshmoe", spec.moe.capacity_factor), ("lshmoe-dropless", None)):
        layer = MoELayer(replace(spec.moe, capacity_factor=cf), spec.d_model, comm, layer_id=0)
        with torch.no_grad():
            layer.router.weight.normal_(0, 0.02)
        layer.experts.reset_parameters(0, 0, 0.02, 0.02)
        layers[name] = layer
    if with_ds:
        layers["deepspeed"] = DeepSpeedMoE(spec.moe, spec.d_model, comm, 0)
    x = torch.randn(spec.tokens, spec.d_model, requires_grad=True)
    world = comm.group("world")
    flag = torch.zeros(1)
    for layer in layers.values():
        for _ in range(spec.warmup):
            _fwd_bwd(layer, x)
    times: dict[str, list[float]] = {n: [] for n in layers}
    names = list(layers)
    for rep in range(spec.reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            comm.all_reduce(flag, world, "bench.barrier", phase="metrics")
            t0 = time.perf_counter()
            for _ in range(spec.iters):
                _fwd_bwd(layers[name], x)
            t = torch.tensor([(time.perf_counter() - t0) / spec.iters])
            comm.all_reduce(t, world, "bench.time", op="max", phase="metrics")
            times[name].append(float(t))
        comm.ledger.end_step()
    return times


def run(worlds: list[int], top_ks: list[int], spec: LayerSpec, with_ds: bool) -> list[dict]:
    rows = []
    for w in worlds:
        for k in top_ks:
            s = replace(spec, moe=replace(spec.moe, top_k=k))
            times = run_ranks(_worker, w, s, with_ds, timeout_s=120, threads=max(1, (os.cpu_count() or 1) // w))[0]
            for name, ts in times.items():
                med = median(ts)
                rows.append(
                    {
                        "world": w,
                        "top_k": k,
                        "impl": name,
                        "median_s": med,
                        "tokens_per_s": w * s.tokens / med,
                        "times_s": ts,
                    }
                )
            base = {r["impl"]: r for r in rows if r["world"] == w and r["top_k"] == k}
            if "deepspeed" in base:
                for r in base.values():
                    r["vs_deepspeed"] = r["tokens_per_s"] / base["deepspeed"]["tokens_per_s"]
            print_table(
                ["W", "K", "impl", "median ms", "tokens/s", "x DeepSpeed"],
                [
                    [
                        r["world"],
                        r["top_k"],
                        r["impl"],
                        1000 * r["median_s"],
                        r["tokens_per_s"],
                        r.get("vs_deepspeed", "-"),
                    ]
                    for r in base.values()
                ],
            )
    return rows


def _plot(rows: list[dict], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["top_k"] for r in rows})
    fig, axes = plt.subplots(1, len(ks), figsize=(5 * len(ks), 3.6), squeeze=False)
    for ax, k in zip(axes[0], ks, strict=True):
        at_k = [r for r in rows if r["top_k"] == k]
        bar_groups(
            ax,
            sorted({r["world"] for r in rows}),
            sorted({r["impl"] for r in rows}),
            lambda w, impl, at_k=at_k: next(
                (r["tokens_per_s"] for r in at_k if r["world"] == w and r["impl"] == impl), 0
            ),
            lambda w: f"W={w}",
        )
        ax.set_title(f"MoE layer fwd+bwd, top-{k}")
        ax.set_ylabel("tokens/s (all ranks)")
        ax.legend(fontsize=8)
    return save_plot(fig, out, "moe_layer")


def _table_row(r: dict) -> list:
    vs = f"{r['vs_deepspeed']:.2f}x" if "vs_deepspeed" in r else "-"
    return [r["world"], r["top_k"], r["impl"], 1000 * r["median_s"], r["tokens_per_s"], vs]


def parser() -> argparse.ArgumentParser:
    p = bench_parser("lshmoe bench layer", __doc__, cluster=False)
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--top-k", default="1,2")
    p.add_argument("--tokens", type=int, default=LayerSpec().tokens)
    p.add_argument("--reps", type=int, default=LayerSpec().reps)
    p.add_argument("--no-deepspeed", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    with_ds = have_deepspeed() and not a.no_deepspeed
    if not with_ds and not a.no_deepspeed:
        print("DeepSpeed is not installed (pip install torch==2.13.0 deepspeed); measuring lshmoe only")
    spec = LayerSpec(tokens=a.tokens, reps=a.reps)
    rows = run([int(w) for w in a.worlds.split(",")], [int(k) for k in a.top_k.split(",")], spec, with_ds)
    png = _plot(rows, a.out)
    table = md_table(
        ["W", "top-k", "implementation", "median ms/iter", "tokens/s", "vs DeepSpeed"], [_table_row(r) for r in rows]
    )
    body = (
        f"MoE layer forward+backward, {spec.tokens} tokens/rank, D={spec.d_model}, F={spec.moe.d_expert}, "
        f"E={spec.moe.num_experts} GeLU experts sharded over W gloo ranks (EP = W), float32, capacity factor "
        f"{spec.moe.capacity_factor} (lshmoe also dropless). {spec.reps} interleaved repetitions x {spec.iters} "
        f"iterations; time = slowest rank; tokens/s counts all ranks.\n\n{table}\n\n![moe layer]({png})\n"
    )
    write_section(
        a.out, "moe_layer", "MoE layer throughput vs DeepSpeed (CPU, gloo)", body, {"spec": spec.record(), "rows": rows}
    )
    return 0
