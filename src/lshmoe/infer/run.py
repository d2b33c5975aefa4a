"""`lshmoe infer`: score a trained checkpoint's validation data with Lina's expert placement.

    lshmoe infer --checkpoint out/checkpoints --nproc 4 [--placement popularity|uniform] [--compare]
                 [--<infer field> value ...]

Every rank loads every expert of the checkpoint (any expert-parallel layout it was saved with),
builds the path profile from `--profile-batches` training batches per rank (uniform placement, top-1
routes, gathered from every rank), then scores `--batches` validation batches of `--batch-size`
sequences per rank. Rank 0 prints the validation loss and, per MoE layer, the MoE-layer latency
p50/p95, the rows-per-rank load max/mean, the estimation accuracy of phase 1 and the re-plan rate
of phase 2; `--out FILE.json` keeps every number. `--compare` scores each batch with both
placements (rotating the order) and checks that their logits are identical. Every field of the
`infer` config section is a flag (`--path-len`, `--estimate-top-k`, `--match-k`, `--ordered-match`,
`--profile-routes`, `--infer-dtype`, ...; generated as `lshmoe train`'s are).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from lshmoe import config as C
from lshmoe.cliutil import Parser, add_config_flags, apply_flags, under_launcher
from lshmoe.errors import UserError
from lshmoe.infer.servable import check_servable

# run-only flags and their least value (the placement's options are the `infer` config section's flags)
MINIMA = {"nproc": 1, "profile_batches": 1, "batches": 1, "batch_size": 1, "threads": 1}


def build_parser() -> Parser:
    p = Parser(prog="lshmoe infer", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint", required=True, help="a checkpoint directory, or a checkpoints root with a 'latest' pointer"
    )
    p.add_argument("--nproc", type=int, default=1, help="local ranks (>= 1)")
    p.add_argument("--compare", action="store_true", help="score every batch with both placements")
    p.add_argument("--profile-batches", type=int, default=8, help="training batches per rank for the profile (>= 1)")
    p.add_argument("--batches", type=int, default=20, help="validation batches scored (>= 1)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per batch (>= 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (>= 1)")
    p.add_argument("--out", help="write the metrics as JSON to this file (rank 0)")
    add_config_flags(p, ["infer"])
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, C.InferConfig]:
    """The run's flags and its `InferConfig` (defaults < flags), checked: one line per mistake, before any
    process starts."""
    a = build_parser().parse_args(argv)
    for name, low in MINIMA.items():
        if getattr(a, name) < low:
            raise UserError(f"--{name.replace('_', '-')} {getattr(a, name)}: must be >= {low}")
    cfg = C.validate(apply_flags(C.Config(), a))
    return a, cfg.infer


def main(argv: list[str]) -> int:
    a, icfg = parse(argv)
    from lshmoe.train import checkpoint as ckpt

    path = ckpt.find_checkpoint(a.checkpoint, "--checkpoint")
    check_servable(path, ckpt.read_meta(path))
    if under_launcher() or a.nproc == 1:
        run_rank(a, icfg, path)
        return 0
    ckpt.verify_files(path)
    from lshmoe.distributed.launch import launch

    return launch(["infer", *argv], a.nproc)


def run_rank(a: argparse.Namespace, icfg: C.InferConfig, path: Path) -> None:
    from lshmoe.config import DistConfig
    from lshmoe.data import load_data
    from lshmoe.distributed.setup import init_comm, shutdown
    from lshmoe.infer.engine import InferenceEngine
    from lshmoe.infer.metrics import summarise

    comm = init_comm(DistConfig(threads=a.threads))
    say = (lambda m: print(f"[lshmoe] {m}", file=sys.stderr, flush=True)) if comm.rank == 0 else (lambda m: None)
    try:
        eng = InferenceEngine.from_checkpoint(path, comm, icfg)
        cfg, dev, rank, world = eng.cfg, comm.device, comm.rank, comm.world_size
        data = load_data(cfg.data, say)
        B, S = a.batch_size, cfg.model.seq_len
        say(
            f"{world} rank(s), {len(eng.moe_ids)} MoE layers x {cfg.moe.num_experts} experts from {path}; "
            f"profiling {a.profile_batches} batches per rank"
        )
        eng.profile(data.train_batch(i, rank, B, S, cfg.train.seed, dev)[0] for i in range(a.profile_batches))
        modes = list(C.PLACEMENTS) if a.compare else [icfg.placement]
        recs: dict[str, list] = {m: [] for m in modes}
        identical = 0
        for i in range(a.batches):
            x, y = data.val_batch(i, rank, world, B, S, dev, a.batches)
            logits = []
            for mode in modes[i % len(modes) :] + modes[: i % len(modes)]:
                eng.set_placement(mode)
                out, m = eng.score(x, y)
                logits.append(out.logits_BSV)
                recs[mode].append(m)
            same = torch.tensor([float(all(torch.equal(logits[0], o) for o in logits[1:]))], device=dev)
            comm.all_reduce(same, comm.group("world"), "infer.identical", op="min", phase="metrics")
            identical += int(bool(same))
            if (i + 1) % max(1, a.batches // 4) == 0:
                say(f"batch {i + 1}/{a.batches}")
        result = {
            "checkpoint": str(path),
            "world_size": world,
            "batches": a.batches,
            "batch_size": B,
            "identical_batches": identical if a.compare else None,
            "placements": {m: summarise(r) for m, r in recs.items()},
        }
        if rank == 0:
            _print(result)
            if a.out:
                Path(a.out).write_text(json.dumps(result, indent=1, default=_json))
        if a.compare and identical != a.batches:
            raise RuntimeError(f"placements disagreed on {a.batches - identical} of {a.batches} batches")
    finally:
        shutdown()


def _json(o: object) -> object:
    return dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)


def _print(result: dict) -> None:
    for mode, s in result["placements"].items():
        acc = "-" if s["accuracy"] is None else f"{100 * s['accuracy']:.0f}%"
        print(
            f"{mode}: val loss {s['ce_loss']:.4f}, MoE layer p50 {s['layer_p50_ms']:.1f} ms p95 "
            f"{s['layer_p95_ms']:.1f} ms, batch p95 {s['batch_p95_ms']:.1f} ms, load max/mean "
            f"{s['load_max_mean']:.2f}, estimate accuracy {acc}, re-planned {100 * s['replan_rate']:.0f}%"
        )
        print("  layer  p50 ms  p95 ms  load max/mean  accuracy  replicas(max)")
        for r in s["per_layer"]:
            acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.0f}%"
            print(
                f"  {r['layer']:>5}  {r['p50_ms']:>6.1f}  {r['p95_ms']:>6.1f}  {r['load_max_mean']:>13.2f}  "
                f"{acc:>8}  {r['max_replicas']:>13}"
            )
    if result["identical_batches"] is not None:
        print(f"identical logits under both placements: {result['identical_batches']}/{result['batches']} batches")
