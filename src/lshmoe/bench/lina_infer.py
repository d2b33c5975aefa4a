"""Lina's inference placement on an emulated cluster: uniform expert parallelism vs popularity placement.

1. A model with naturally skewed routing: the default GPT-MoE with an MoE layer in every block (4 MoE
   layers, so paths have up to 3 earlier experts) trained without the load-balance loss
   (`moe.aux_loss_weight=0`) on 2 local ranks; the checkpoint is cached by its config and reused.
2. Inference on N emulated nodes x R ranks (network namespaces, `tc tbf` on the inter-node links; or
   loopback with `--no-emulation`): every rank loads every expert; the path profile is built from
   training batches; then each validation batch is scored by the same processes with uniform placement
   (expert e on rank e // (E / W)), with Lina's two-phase popularity placement (`lina`, the paper's
   top-1 path profile) and with the same placement from a profile of the next layer's K routed
   experts (`lina-routes`), rotating which goes first. All must give identical logits (checked).

Per placement: p50/p95 of the MoE-layer latency (slowest rank, every layer of every batch) and of the
batch latency, the rows computed per rank (max/mean), and for Lina the estimation accuracy (phase 1's
top-2 experts == the actual top-2) and the re-plan rate (phase 2 changed the plan).

Run: `lshmoe bench lina-infer` (root + iproute2), or `--no-emulation`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from lshmoe.bench.harness import Cluster, base_config, bench_parser, cluster_from, recorded_args, run_spec, run_training
from lshmoe.bench.report import md_table, save_plot, write_section
from lshmoe.config import Config, DistConfig, validate
from lshmoe.data import default_cache_dir, load_data
from lshmoe.distributed.setup import init_comm, shutdown
from lshmoe.infer.engine import InferConfig, InferenceEngine
from lshmoe.infer.metrics import BatchMetrics, summarise
from lshmoe.infer.profile import build_profile
from lshmoe.train import checkpoint as ckpt

# The skewed model: every block MoE, no load-balance loss, trained on 2 local ranks.
TRAIN_OVERRIDES = {
    "model.moe_every": "1",
    "moe.aux_loss_weight": "0",
    "train.batch_size": "8",
    "train.eval_every": "0",
    "train.log_every": "25",
}
TRAIN_RANKS = 2
# label -> (placement, what the path profile predicts). "lina" is the paper's method; "lina-routes" profiles
# the next layer's K routed experts instead of its top-1 (a load-share estimate; see infer/profile.py).
VARIANTS = {"uniform": ("uniform", "top1"), "lina": ("popularity", "top1"), "lina-routes": ("popularity", "all")}
MODES = tuple(VARIANTS)


# ---------------------------------------------------------------------------------------- the model


def train_config(steps: int, sets: list[str]) -> Config:
    cfg = base_config(
        [*(f"{k}={v}" for k, v in TRAIN_OVERRIDES.items()), f"train.steps={steps}", f"train.save_every={steps}", *sets]
    )
    return validate(cfg, TRAIN_RANKS)


def trained_checkpoint(cfg: Config, retrain: bool) -> Path:
    """Train the model once per config (cached under the data cache), or reuse the cached checkpoint."""
    sig = {s: dataclasses.asdict(getattr(cfg, s)) for s in ("model", "moe", "data")}
    sig["train"] = {
        k: v
        for k, v in dataclasses.asdict(cfg.train).items()
        if k not in ("out_dir", "ckpt_dir", "progress", "log_every", "resume", "keep_last")
    }
    key = hashlib.blake2b(json.dumps(sig, sort_keys=True).encode(), digest_size=8).hexdigest()
    cache = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()
    root = cache / "lina_infer" / key
    found = ckpt.latest(root / "checkpoints")
    if found is not None and not retrain:
        print(f"reusing the trained model {found}", flush=True)
        return found
    cfg.train.ckpt_dir = str(root / "checkpoints")
    print(f"training the skewed model ({cfg.train.steps} steps on {TRAIN_RANKS} ranks) into {root}", flush=True)
    t0 = time.perf_counter()
    recs = run_training(cfg, Cluster(nodes=1, ranks_per_node=TRAIN_RANKS), root / "run")
    last = [r for r in recs if r["kind"] == "eval"][-1]
    print(f"trained in {time.perf_counter() - t0:.0f} s, val loss {last['val_loss']:.3f}", flush=True)
    return ckpt.latest(root / "checkpoints")


# ---------------------------------------------------------------------------------------- one rank


def worker(spec: dict) -> None:
    """One inference rank: profile, then score every batch with both placements, alternating."""
    comm = init_comm(DistConfig(threads=spec["threads"], timeout_s=300))
    try:
        eng = InferenceEngine.from_checkpoint(Path(spec["checkpoint"]), comm, InferConfig(**spec["infer"]))
        cfg, dev, rank, world = eng.cfg, comm.device, comm.rank, comm.world_size
        data = load_data(cfg.data)
        B, S = spec["batch_size"], cfg.model.seq_len
        t0 = time.perf_counter()
        ids_LTK = eng.record_routes(
            data.train_batch(i, rank, B, S, cfg.train.seed, dev)[0] for i in range(spec["profile_batches"])
        )
        E, l = cfg.moe.num_experts, eng.icfg.path_len
        profiles = {
            "top1": build_profile(ids_LTK[:, :, 0], E, l),
            "all": build_profile(ids_LTK[:, :, 0], E, l, routes_LTK=ids_LTK),
        }
        profile_s = time.perf_counter() - t0
        n, warm = spec["batches"], spec["warmup"]
        rec: dict[str, list[dict]] = {m: [] for m in MODES}
        identical = 0
        for i in range(warm + n):
            x, y = data.val_batch(i % n, rank, world, B, S, dev, n)
            logits = []
            for label in MODES[i % len(MODES) :] + MODES[: i % len(MODES)]:  # rotate the order every batch
                placement, routes = VARIANTS[label]
                eng.set_placement(placement)
                eng.set_profile(profiles[routes])
                out, m = eng.score(x, y)
                logits.append(out.logits_BSV)
                if i >= warm:
                    rec[label].append(dataclasses.asdict(m))
            same = torch.tensor([float(all(torch.equal(logits[0], o) for o in logits[1:]))], device=dev)
            comm.all_reduce(same, comm.group("world"), "bench.identical", op="min", phase="metrics")
            identical += int(i >= warm and bool(same))
        if rank == 0:
            paths = [int(layer[-1].keys_P.numel()) for layer in profiles["top1"].tables]
            Path(spec["out"]).write_text(
                json.dumps(
                    {
                        "world_size": world,
                        "batches": n,
                        "identical_batches": identical,
                        "profile_s": profile_s,
                        "profile_tokens": int(ids_LTK.shape[1]),
                        "profile_full_paths": paths,
                        "records": rec,
                        "model": {
                            "d_model": cfg.model.d_model,
                            "n_layers": cfg.model.n_layers,
                            "moe_layers": len(eng.moe_ids),
                            "experts": cfg.moe.num_experts,
                            "top_k": cfg.moe.top_k,
                            "d_expert": cfg.moe.d_expert,
                        },
                    }
                )
            )
    finally:
        shutdown()


def run_inference(spec: dict, cluster: Cluster, work_dir: Path) -> dict:
    return run_spec(["lshmoe.bench.lina_infer", "--worker"], spec, cluster, work_dir, "the inference ranks")


# ---------------------------------------------------------------------------------------- report


def rows_of(result: dict) -> dict[str, dict]:
    return {m: {**summarise([BatchMetrics(**r) for r in result["records"][m]]), "variant": m} for m in MODES}


def change(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.0f}%" if old else "-"


def tables(s: dict[str, dict]) -> tuple[str, str]:
    u = s["uniform"]
    head = [
        "placement",
        "MoE layer p50 ms",
        "p95 ms",
        "p95 vs uniform",
        "batch p50 ms",
        "p95 ms",
        "p95 vs uniform",
        "load max/mean",
        "p95",
        "expert compute p95 ms",
        "vs uniform",
        "top-2 accuracy",
        "re-plan rate",
    ]
    rows = []
    for r in s.values():
        base = r is u
        rows.append(
            [
                r["variant"],
                r["layer_p50_ms"],
                r["layer_p95_ms"],
                "" if base else change(r["layer_p95_ms"], u["layer_p95_ms"]),
                r["batch_p50_ms"],
                r["batch_p95_ms"],
                "" if base else change(r["batch_p95_ms"], u["batch_p95_ms"]),
                r["load_max_mean"],
                r["load_max_mean_p95"],
                r["compute_p95_ms"],
                "" if base else change(r["compute_p95_ms"], u["compute_p95_ms"]),
                "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.0f}%",
                "-" if base else f"{100 * r['replan_rate']:.0f}%",
            ]
        )
    main = md_table(head, rows)
    per_head = (
        ["MoE layer"]
        + [f"{m} p95 ms" for m in MODES]
        + [f"{m} load max/mean" for m in MODES]
        + [f"{m} accuracy / re-plan / most replicas" for m in MODES[1:]]
    )
    per_rows = []
    for i, a in enumerate(u["per_layer"]):
        row = [a["layer"]] + [s[m]["per_layer"][i]["p95_ms"] for m in MODES]
        row += [s[m]["per_layer"][i]["load_max_mean"] for m in MODES]
        for m in MODES[1:]:
            b = s[m]["per_layer"][i]
            row.append(f"{100 * b['accuracy']:.0f}% / {100 * b['replan_rate']:.0f}% / {b['max_replicas']}")
        per_rows.append(row)
    return main, md_table(per_head, per_rows)


def plot(result: dict, s: dict[str, dict], out: Path, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for mode in MODES:
        lat = sorted(1e3 * v for r in result["records"][mode] for v in r["layer_s"])
        ax1.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=mode)
    ax1.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax1.set(xlabel="MoE-layer latency (ms, slowest rank)", ylabel="fraction of layer calls", title="latency CDF")
    ax1.legend(fontsize=8)
    L = len(s["uniform"]["per_layer"])
    width = 0.8 / len(MODES)
    for j, mode in enumerate(MODES):
        ax2.bar(
            [x - 0.4 + width * (j + 0.5) for x in range(L)],
            [r["load_max_mean"] for r in s[mode]["per_layer"]],
            width,
            label=mode,
        )
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set(xticks=list(range(L)), xlabel="MoE layer", ylabel="rows per rank: max / mean", title="load imbalance")
    ax2.legend(fontsize=8)
    return save_plot(fig, out, name)


def verdict(s: dict[str, dict]) -> str:
    u, p = s["uniform"], s["lina"]
    met = "met" if p["layer_p95_ms"] <= 0.65 * u["layer_p95_ms"] else "not met"
    return (
        f"Paper target (p95 MoE-layer latency at least 35% below uniform placement): **{met}** by `lina` here "
        f"(p95 {u['layer_p95_ms']:.1f} -> {p['layer_p95_ms']:.1f} ms, "
        f"{change(p['layer_p95_ms'], u['layer_p95_ms'])}). Its load max/mean went from {u['load_max_mean']:.2f} "
        f"to {p['load_max_mean']:.2f}, and the p95 of the busiest rank's expert compute changed by "
        f"{change(p['compute_p95_ms'], u['compute_p95_ms'])}. Under uniform placement the busiest rank's expert "
        f"compute is a median {100 * u['compute_share']:.0f}% of a layer call; with it perfectly balanced at no "
        f"cost the layer p95 would be {u['balanced_p95_ms']:.1f} ms "
        f"({change(u['balanced_p95_ms'], u['layer_p95_ms'])}), the most any placement can gain here."
    )


def sharing_note(world: int, threads: int, load: list[float]) -> str:
    """How much of the machine the ranks had: the wall-time gain of balancing needs a core per rank."""
    cores = os.cpu_count() or 1
    text = (
        f"The machine's 1-minute load average was {load[0]:.1f} before and {load[1]:.1f} after the run "
        f"({cores} cores for {world} ranks x {threads} thread(s))."
    )
    if cores < world * threads + load[0]:
        text += (
            " The ranks shared cores, so a rank that waits for a straggler hands its core to it: balancing the "
            "rows cuts the busiest rank's expert CPU time (the expert compute column) but hardly the layer's "
            "wall time, while Lina's extra exchange per layer costs milliseconds on a loaded machine."
        )
    return text


def parser() -> argparse.ArgumentParser:
    p = bench_parser("lshmoe bench lina-infer", __doc__, name="lina_infer", link="10gbit")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=300, help="training steps of the skewed model")
    p.add_argument("--retrain", action="store_true", help="train again even if a cached checkpoint exists")
    p.add_argument("--batches", type=int, default=60, help="validation batches scored by each placement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="sequences per rank per batch (a serving batch: the larger, the more the layer is compute)",
    )
    p.add_argument("--profile-batches", type=int, default=8, help="training batches per rank for the profile")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.worker:
        worker(json.loads(Path(a.worker).read_text()))
        return 0
    cluster = cluster_from(a, "lshmoe bench lina-infer")
    cfg = train_config(a.steps, a.set)
    load_data(cfg.data, print)
    path = trained_checkpoint(cfg, a.retrain)
    spec = {
        "checkpoint": str(path),
        "infer": dataclasses.asdict(InferConfig()),
        "batches": a.batches,
        "warmup": a.warmup,
        "batch_size": a.batch_size,
        "profile_batches": a.profile_batches,
        "threads": a.threads,
    }
    where = cluster.where(links="inter-node links")
    print(f"== inference: {where}, {a.batches} batches per placement", flush=True)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lshmoe-lina-") as tmp:
        result = run_inference(spec, cluster, Path(tmp))
    result["load_average"] = [load_before, os.getloadavg()[0]]
    s = rows_of(result)
    main_tbl, per_tbl = tables(s)
    print(main_tbl)
    print(per_tbl)
    print(verdict(s))
    png = plot(result, s, a.out, a.name)
    print(sharing_note(a.nodes * a.ranks_per_node, a.threads, result["load_average"]))
    m = result["model"]
    tokens = a.batch_size * cfg.model.seq_len
    body = (
        f"Model: GPT-MoE D={m['d_model']}, {m['n_layers']} blocks all MoE, {m['experts']} experts top-{m['top_k']},"
        f" expert width {m['d_expert']}, trained {a.steps} steps without the load-balance loss "
        f"(`moe.aux_loss_weight=0`) so that routing is naturally skewed. Inference on {where}, "
        f"{a.threads} torch thread(s) per rank, every rank holding every expert; {tokens} tokens per rank per "
        f"batch. Path profile (l=3) from {a.profile_batches} training batches per rank "
        f"({result['profile_tokens']} tokens). {result['batches']} validation batches, each scored by every "
        f"placement in the same processes, rotating which goes first, after {a.warmup} warm-up batches. "
        f"Variants: `uniform` (expert e on rank e // (E/W)); `lina` (the paper's two-phase placement, profile "
        f"of the next layer's top-1 expert); `lina-routes` (the same, profiling the next layer's K routed "
        f"experts, i.e. its load share). Latencies are wall times of the slowest rank; a MoE layer's runs from "
        f"its gate to its combine and includes Lina's phase-2 exchange (one small all-to-all), the count "
        f"exchange and both payload all-to-alls (phase 1's path lookup runs before the block and counts in "
        f"the batch latency only). "
        f"Load: rows computed per rank, max over mean. Expert compute: CPU time of the busiest rank's expert "
        f"matmuls, the layer's critical path on devices that do not share cores. Accuracy: phase 1's top-2 "
        f"experts equal the actual top-2 (as a set). Logits identical across the three placements in "
        f"{result['identical_batches']}/{result['batches']} batches.\n\n{main_tbl}\n\nPer MoE layer:\n\n"
        f"{per_tbl}\n\n{verdict(s)} {sharing_note(a.nodes * a.ranks_per_node, a.threads, result['load_average'])}"
        f"\n\n![lina_infer]({png})\n"
    )
    write_section(
        a.out,
        a.name,
        f"Lina: popularity-driven expert placement for inference ({where})",
        body,
        {"summary": s, "result": result, "args": recorded_args(a)},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
