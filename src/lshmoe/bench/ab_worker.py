"""One rank of an interleaved A/B speed comparison: several variants trained by the same processes.

`python -m lshmoe.bench.ab_worker SPEC.json` (under torchrun or an emulated-cluster launcher).
Each variant (e.g. baseline, LSH-MoE) has its own model and optimizer; the rank alternates blocks
of `steps_per_round` training steps between the variants, rotating the order every round, so every
variant sees the same network and machine conditions. The first `warmup_rounds` rounds are not
measured. Per step the rank records its step time and its ledger summary; at block boundaries the
first rank of each node reads its link interface's byte counter. At the end the ranks reduce their
numbers and rank 0 writes SPEC["out"]:

    per variant: step_time_s (per step, slowest rank), a2a/allreduce/comm seconds (mean over ranks),
    a2a and inter-node bytes (sum over ranks), interface bytes (sum over nodes), rows routed/sent,
    compressor seconds per step (`lsh_s`; for LSH-MoE hash + cluster + restore; mean over ranks, summed
    over layers), rank 0's training-loss curve, and the validation loss after training (every variant
    saw the same tokens).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from lshmoe.bench.progress import Progress
from lshmoe.config import from_dict
from lshmoe.data import load_data
from lshmoe.distributed.setup import init_comm, shutdown
from lshmoe.train.gpt_task import GPTTask
from lshmoe.train.loop import Trainer

# per-step numbers and how the ranks' values are combined: the slowest rank's, the sum, or the mean
PER_STEP = {
    "step_time_s": "max",
    "a2a_time_s": "mean",
    "a2a_exposed_s": "mean",
    "exposed_s": "mean",
    "allreduce_time_s": "mean",
    "comm_time_s": "mean",
    "a2a_bytes": "sum",
    "a2a_bytes_fwd": "sum",
    "a2a_bytes_bwd": "sum",
    "allreduce_bytes": "sum",
    "inter_node_bytes": "sum",
    "rows_routed": "sum",
    "rows_sent": "sum",
    "lsh_s": "mean",  # the compressor's seconds (named for the report's LSH column)
}


def compressor_seconds(layer_stats: dict[int, dict[str, float]]) -> float:
    """Seconds the compressors spent in the step, summed over layers: the layer reports rows and bytes,
    so every `*_s` entry of its stats is its compressor's (hashing, clustering, restore, ...)."""
    return sum(v for st in layer_stats.values() for k, v in st.items() if k.endswith("_s"))


def _iface_tx() -> int:
    dev = os.environ.get("GLOO_SOCKET_IFNAME")
    if not dev:
        return 0
    try:
        return int(Path(f"/sys/class/net/{dev}/statistics/tx_bytes").read_text())
    except OSError:
        return 0


def run(spec: dict) -> None:
    variants = {name: from_dict(cfg) for name, cfg in spec["variants"].items()}
    for name, cfg in variants.items():  # each variant's files beside the result, not a new run under runs/
        cfg.train.out_dir = cfg.train.out_dir or str(Path(spec["out"]).parent / "variants" / name)
    first = next(iter(variants.values()))
    comm = init_comm(first.dist, first.moe.ep_size)
    data = load_data(first.data)
    impls = spec.get("impls", {})  # variant -> "deepspeed" to put DeepSpeed's MoE layer in the same model
    trainers = {}
    for name, cfg in variants.items():
        if impls.get(name) == "deepspeed":
            from lshmoe.bench.deepspeed_moe import DeepSpeedMoE

            trainers[name] = Trainer(cfg, comm, GPTTask(DeepSpeedMoE, data))
        else:
            trainers[name] = Trainer(cfg, comm, GPTTask(data=data))
    names = list(trainers)
    world = comm.group("world")
    flag = torch.zeros(1, device=comm.device)
    local_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    rec: dict[str, dict[str, list[float]]] = {n: {k: [] for k in PER_STEP} for n in names}
    iface: dict[str, float] = dict.fromkeys(names, 0.0)
    steps = dict.fromkeys(names, 0)
    losses: dict[str, list[float]] = {n: [] for n in names}
    by_tag: dict[str, list[dict[str, float]]] = {n: [] for n in names}  # this rank's all-to-all seconds per step
    rounds = spec["rounds"] + spec["warmup_rounds"]
    progress = Progress(names, rounds * spec["steps_per_round"] * len(names)) if spec.get("progress") else None
    for rnd in range(spec["rounds"] + spec["warmup_rounds"]):
        measured = rnd >= spec["warmup_rounds"]
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            comm.all_reduce(flag, world, "ab.barrier", phase="metrics")
            tx0 = _iface_tx()
            for _ in range(spec["steps_per_round"]):
                tr = trainers[name]
                values = tr.train_step(steps[name])
                steps[name] += 1
                losses[name].append(values["loss"])
                if not measured:
                    continue
                c = tr.last_comm
                row = {
                    "step_time_s": values["step_time_s"],
                    "a2a_time_s": c.a2a_time_s,
                    "a2a_exposed_s": c.a2a_exposed_s,
                    "exposed_s": c.exposed_s,
                    "allreduce_time_s": c.allreduce_time_s,
                    "comm_time_s": c.comm_time_s,
                    "a2a_bytes": c.a2a_bytes,
                    "a2a_bytes_fwd": c.a2a_bytes_fwd,
                    "a2a_bytes_bwd": c.a2a_bytes_bwd,
                    "allreduce_bytes": c.allreduce_bytes,
                    "inter_node_bytes": c.inter_node_bytes,
                    "rows_routed": values["rows_routed"],
                    "rows_sent": values["rows_sent"],
                    "lsh_s": compressor_seconds(tr.last_layer_stats),
                }
                for k in PER_STEP:
                    rec[name][k].append(float(row[k]))
                by_tag[name].append({k: v for k, v in c.by_tag.items() if not k.startswith("grad.chunk")})
            comm.all_reduce(flag, world, "ab.barrier", phase="metrics")
            if measured and local_first:
                iface[name] += _iface_tx() - tx0
            if progress is not None and comm.rank == 0:
                progress.report(sum(steps.values()), rec)
    out = {
        "world_size": comm.world_size,
        "ranks_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", comm.world_size)),
        "variants": {},
    }
    if progress is not None and comm.rank == 0:
        print("[demo] training done; validating every variant on the same held-out batches ...", flush=True)
    for name in names:
        res = {}
        for k in PER_STEP:
            t = torch.tensor(rec[name][k], dtype=torch.float64, device=comm.device)
            how = PER_STEP[k]
            comm.all_reduce(t, world, "ab.reduce", op="max" if how == "max" else "sum", phase="metrics")
            if how == "mean":
                t = t / comm.world_size
            res[k] = t.cpu().tolist()
        tx = torch.tensor([iface[name]], dtype=torch.float64, device=comm.device)
        comm.all_reduce(tx, world, "ab.reduce", phase="metrics")
        res["iface_tx_bytes"] = float(tx)
        res["measured_steps"] = len(rec[name]["step_time_s"])
        res["train_steps"] = steps[name]
        vals = trainers[name].evaluate() if spec.get("evaluate", True) else {}
        res["val_loss"] = vals.get("val_loss")  # exact experts: the model a user deploys
        res["val_loss_compressed"] = vals.get("val_loss_compressed")  # as trained, when lossy
        res["loss_curve"] = losses[name]
        res["by_tag_rank0"] = by_tag[name]
        out["variants"][name] = res
    if comm.rank == 0:
        Path(spec["out"]).write_text(json.dumps(out))
    for tr in trainers.values():
        if tr.sched is not None:
            tr.sched.close()
    shutdown()


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
    # NOTE: end without interpreter finalization, as a launched rank of `lshmoe` does (cli._end_rank): a
    # gloo thread unwound at exit aborts a finished run ("terminate called without an active exception")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
