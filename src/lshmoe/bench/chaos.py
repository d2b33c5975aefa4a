"""Chaos: a training job killed again and again, restarted each time, ends bitwise where an
uninterrupted run ends.

A seeded schedule picks `--failures` faults: a random rank SIGKILLed at a random step, about a third
of them inside a checkpoint save (after that rank's shards are written, before the commit). The job runs on
the emulated cluster (`--nodes` x `--ranks-per-node` namespaces, root + iproute2; loopback with the
same topology otherwise) with a checkpoint every `--save-every` steps, under the restart loop of
`lshmoe train --max-restarts` (each attempt a fresh rendezvous, TORCHELASTIC_RESTART_COUNT set), so
every restart resumes from the latest complete checkpoint. Each fault fires once (`train/faults.py`).

Then the same job runs once more without faults, and the two are compared: every tensor of the
final checkpoint (weights, AdamW moments and steps, RNG states; everything but the wall-clock
counter) and the training loss of every step, bitwise (CPU, float32). The report gives, per failure:
the step it hit, the checkpoint the job resumed from (steps lost), the time to detect it (kill ->
every rank gone), to restart (new attempt -> resumed) and the wall time until the job was back at
the step it had reached; and the totals against the uninterrupted run.

Run: `lshmoe bench chaos --out docs/bench` (10 failures, 120 steps); `--no-emulation` on loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from lshmoe.bench.harness import bench_parser, cluster_from
from lshmoe.bench.netns import EmulatedCluster
from lshmoe.bench.report import md_table, write_section
from lshmoe.config import Config, Fault, apply_sets, set_value, validate
from lshmoe.data import load_data
from lshmoe.distributed.launch import loopback_envs, restart_envs, supervise, with_restarts
from lshmoe.train.faults import read_fired

# A small model, so that a run of a hundred steps costs seconds, not minutes, and the time goes to
# what is measured here: failures, detection, restarts and recomputation.
BENCH_OVERRIDES = {
    "model.d_model": "64",
    "model.n_layers": "2",
    "model.n_heads": "2",
    "model.seq_len": "64",
    "moe.num_experts": "8",
    "moe.d_expert": "64",
    "train.batch_size": "4",
    "train.eval_every": "0",
    "train.eval_batches": "2",
    "train.log_every": "1",
    "train.keep_last": "3",
    "train.progress": "false",
    "dist.threads": "1",
    "dist.heartbeat_s": "0.5",
}


@dataclass(kw_only=True)
class ChaosSpec:
    failures: int = 10
    steps: int = 120
    save_every: int = 10
    nodes: int = 2
    ranks_per_node: int = 2
    link: str | None = None  # tc tbf rate of the inter-node links; None = unthrottled
    seed: int = 0
    timeout_s: float = 30.0
    emulate: bool = True

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node


def schedule(spec: ChaosSpec) -> list[Fault]:
    """`failures` faults at distinct steps; every third one (on average) inside a save."""
    rng = random.Random(spec.seed)
    saves = [s for s in range(spec.save_every, spec.steps, spec.save_every)]
    n_save = min(len(saves), max(1, round(spec.failures / 3)))
    save_steps = rng.sample(saves, n_save)
    others = [s for s in range(1, spec.steps) if s not in save_steps]
    kill_steps = rng.sample(others, spec.failures - n_save)
    faults = [Fault("killsave", rng.randrange(spec.world), s) for s in save_steps]
    faults += [Fault("kill", rng.randrange(spec.world), s) for s in kill_steps]
    return sorted(faults, key=lambda f: f.step)


def bench_config(spec: ChaosSpec, sets: list[str]) -> Config:
    cfg = Config()
    for k, v in BENCH_OVERRIDES.items():
        set_value(cfg, k, v)
    apply_sets(cfg, sets)
    cfg.train.steps, cfg.train.save_every = spec.steps, spec.save_every
    cfg.dist.timeout_s = spec.timeout_s
    cfg.dist.ranks_per_node = spec.ranks_per_node
    return validate(cfg, spec.world)


def run_job(spec: ChaosSpec, config: Path, out: Path, faults: list[Fault]) -> tuple[int, list[dict]]:
    """Run the job with restarts (as many as faults); return its status and each attempt's times."""
    cmd = [sys.executable, "-m", "lshmoe", "train", "--config", str(config), "--out-dir", str(out)]
    if faults:
        cmd += ["--fault", ",".join(map(str, faults))]
    attempts: list[dict] = []

    def timed(start: Callable[[int], int]) -> Callable[[int], int]:
        def attempt(n: int) -> int:
            t0 = time.time()
            rc = start(n)
            attempts.append({"attempt": n, "start": t0, "end": time.time(), "status": rc})
            return rc

        return attempt

    if spec.emulate:
        with EmulatedCluster(spec.nodes, spec.ranks_per_node, link=spec.link) as cluster:
            base = 29100 + (int(time.time()) % 40) * 20

            def start(n: int) -> int:
                envs = [cluster.rank_env(r, base + n) for r in range(spec.world)]
                cmds = [cluster.exec_prefix(cluster.node_of(r)) + cmd for r in range(spec.world)]
                return supervise(cmds, restart_envs(envs, n), grace_s=spec.timeout_s)

            rc = with_restarts(timed(start), len(faults))
    else:

        def start(n: int) -> int:
            envs = restart_envs(loopback_envs(spec.world, spec.ranks_per_node), n)
            return supervise([cmd] * spec.world, envs, grace_s=spec.timeout_s)

        rc = with_restarts(timed(start), len(faults))
    return rc, attempts


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def losses(out: Path) -> dict[int, float]:
    """Training loss per step, the last record of each step winning (a resumed attempt appends)."""
    return {r["step"]: r["loss"] for r in _records(out) if r.get("kind") == "train"}


def final_state(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the newest checkpoint of a run, by key."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root = out / "checkpoints"
    path = root / (root / "latest").read_text().strip()
    with tempfile.TemporaryDirectory(prefix="lshmoe-chaos-") as tmp:
        dcp_to_torch_save(str(path), f"{tmp}/state.pt")
        return torch.load(f"{tmp}/state.pt", weights_only=False)


def differences(clean: Path, chaos: Path) -> list[str]:
    """Keys of the final checkpoints and steps of the loss curves that are not bitwise equal."""
    a, b = final_state(clean), final_state(chaos)
    wall_clock = {"trainer/train_time_s"}
    out = [f"{k}: only in one run" for k in sorted(set(a) ^ set(b))]
    for k in sorted((set(a) & set(b)) - wall_clock):
        va, vb = a[k], b[k]
        same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb
        if not same:
            out.append(f"{k}: differs")
    la, lb = losses(clean), losses(chaos)
    if sorted(la) != sorted(lb):
        out.append(f"losses: steps {sorted(set(la) ^ set(lb))} in one run only")
    out += [f"loss at step {s}: {la[s]!r} != {lb[s]!r}" for s in sorted(set(la) & set(lb)) if la[s] != lb[s]]
    return out


def per_failure(out: Path, attempts: list[dict]) -> list[dict]:
    """What each fired fault cost: steps lost, detection, restart and wall time until back."""
    fired, recs = read_fired(out), _records(out)
    starts = {r["restart"]: r for r in recs if r.get("kind") in ("config", "resume") and "restart" in r}
    rows = []
    for i, f in enumerate(fired):
        t_kill, step = f["time"], f["step"]
        nxt = starts.get(i + 1)
        resumed = nxt["step"] if nxt else None
        ended = attempts[i]["end"] if i < len(attempts) else None
        began = attempts[i + 1]["start"] if i + 1 < len(attempts) else None
        after = ended if ended is not None else t_kill  # records of the failed attempt itself do not count
        back = [
            r["wall_time"]
            for r in recs
            if "wall_time" in r and r["wall_time"] > after and r.get("step", -1) >= step and r.get("kind") != "config"
        ]
        rows.append(
            {
                "fault": f["fault"],
                "during_save": f["fault"].startswith("killsave"),
                "step": step,
                "resumed_from": resumed,
                "steps_lost": None if resumed is None else step - resumed,
                "detect_s": None if ended is None else ended - t_kill,
                "restart_s": None if (nxt is None or began is None) else nxt["wall_time"] - began,
                "wall_lost_s": (min(back) - t_kill) if back else None,
            }
        )
    return rows


def run(spec: ChaosSpec, sets: list[str], work: Path) -> dict:
    """The whole benchmark in `work`; returns the report's data."""
    cfg = bench_config(spec, sets)
    load_data(cfg.data, print)  # built once, before any rank starts
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    faults = schedule(spec)
    for d in (work / "chaos", work / "clean"):
        shutil.rmtree(d, ignore_errors=True)  # a fresh start: nothing to resume, no fault already fired
    print(f"chaos: {len(faults)} faults: {', '.join(map(str, faults))}", flush=True)
    t0 = time.time()
    rc, attempts = run_job(spec, config, work / "chaos", faults)
    chaos_wall = time.time() - t0
    t0 = time.time()
    clean_rc, _ = run_job(spec, config, work / "clean", [])
    clean_wall = time.time() - t0
    if clean_rc != 0:
        raise RuntimeError(f"the uninterrupted run failed with status {clean_rc}")
    rows = per_failure(work / "chaos", attempts)
    diffs = differences(work / "clean", work / "chaos") if rc == 0 else ["the chaos run did not finish"]
    return {
        "spec": vars(spec) | {"sets": sets},
        "schedule": [str(f) for f in faults],
        "status": rc,
        "failures_injected": len(rows),
        "failures_survived": len(rows) if rc == 0 else max(0, len(rows) - 1),
        "attempts": attempts,
        "failures": rows,
        "differences": diffs,
        "chaos_wall_s": chaos_wall,
        "clean_wall_s": clean_wall,
        "wall_lost_s": chaos_wall - clean_wall,
        "max_steps_lost": max((r["steps_lost"] or 0 for r in rows), default=0),
        "load_average": os.getloadavg()[0],  # the 1-minute load at the end: restarts are process starts
    }


def _load_text(res: dict) -> str:
    """The machine's load: restart time is mostly the start of the ranks' Python processes (importing torch)."""
    if res.get("load_average") is not None:
        load = f"1-minute load average at the end of the run: {res['load_average']:.1f}"
    elif res.get("load_average_15min") is not None:
        load = f"15-minute load average right after the run: {res['load_average_15min']:.1f}"
    else:
        return ""
    return (
        f" {load} on {res.get('machine', {}).get('cores', os.cpu_count())} cores (a shared machine); restart "
        "time is mostly the start of the ranks' Python processes and grows with the load."
    )


def report(out: Path, res: dict, name: str = "chaos", command: str | None = None, meta: dict | None = None) -> None:
    spec = res["spec"]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    rows = [
        [
            i + 1,
            r["fault"],
            "yes" if r["during_save"] else "",
            r["step"],
            "-" if r["resumed_from"] is None else r["resumed_from"],
            "-" if r["steps_lost"] is None else r["steps_lost"],
            fmt(r["detect_s"]),
            fmt(r["restart_s"]),
            fmt(r["wall_lost_s"]),
        ]
        for i, r in enumerate(res["failures"])
    ]
    tbl = md_table(
        [
            "#",
            "fault (kind:rank:step)",
            "in a save",
            "steps done",
            "resumed from",
            "steps lost",
            "detect (s)",
            "restart (s)",
            "wall lost (s)",
        ],
        rows,
    )
    where = (
        f"the emulated {spec['nodes']} x {spec['ranks_per_node']} cluster (network namespaces, "
        f"{spec.get('link') or 'unthrottled'} veth)"
        if spec["emulate"]
        else f"loopback ({spec['nodes']} x {spec['ranks_per_node']} topology)"
    )
    diffs = res["differences"]
    verdict = (
        "**Final state and losses: bitwise equal** to the uninterrupted run (every tensor of the final "
        "checkpoint: weights, AdamW moments and steps, RNG states; the loss of every step)."
        if not diffs
        else f"**{len(diffs)} differences**: " + "; ".join(diffs[:10])
    )
    summary = md_table(
        ["failures injected", "survived", "max steps lost", "save interval", "chaos run (s)", "uninterrupted (s)"],
        [
            [
                res["failures_injected"],
                res["failures_survived"],
                res["max_steps_lost"],
                spec["save_every"],
                f"{res['chaos_wall_s']:.0f}",
                f"{res['clean_wall_s']:.0f}",
            ]
        ],
    )
    body = (
        f"{spec['steps']} training steps on {where}, a checkpoint every {spec['save_every']} steps, "
        f"`--timeout-s {spec['timeout_s']:g}`, seed {spec['seed']}. Schedule: {', '.join(res['schedule'])} "
        "(`kill`: SIGKILL before that step; `killsave`: SIGKILL inside the save of that step's checkpoint, "
        "the rank's shards written, nothing committed, so the job resumes from the checkpoint before). "
        "After each failure the job restarts and resumes from the "
        "latest complete checkpoint. *Detect*: kill -> every rank gone; *restart*: new attempt -> resumed "
        "(process start, rendezvous, checkpoint verification and load); *wall lost*: kill -> back at the "
        f"step it had reached.\n\n{summary}\n\n{tbl}\n\n{verdict} Wall time lost in all: "
        f"{res['wall_lost_s']:.0f} s over {res['failures_injected']} failures.{_load_text(res)}\n"
    )
    print(summary)
    print(tbl)
    print(verdict)
    write_section(out, name, "Chaos: failures survived, nothing lost", body, res, command=command, meta=meta)


def parser() -> argparse.ArgumentParser:
    p = bench_parser("lshmoe bench chaos", __doc__, name="chaos", link="none")
    p.add_argument("--failures", type=int, default=10, help="faults injected [default: 10]")
    p.add_argument("--steps", type=int, default=120, help="training steps [default: 120]")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint interval [default: 10]")
    p.add_argument("--seed", type=int, default=0, help="seed of the schedule [default: 0]")
    p.add_argument("--timeout-s", type=float, default=30.0, help="the job's --timeout-s [default: 30]")
    p.add_argument("--work-dir", help="keep the runs here (default: a temporary directory)")
    p.add_argument("--from-json", metavar="PATH", help="re-render the report of a recorded run (its JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.from_json:
        rec = json.loads(Path(a.from_json).read_text())
        report(a.out, rec, a.name, rec["command"], rec["machine"])
        return 0
    saves = len(range(a.save_every, a.steps, a.save_every))
    if a.failures < 1 or a.save_every < 1 or a.steps < 2 or a.failures > a.steps - 1 or saves < 1:
        p.error("need --failures >= 1, --save-every >= 1, and --steps large enough for the failures and a save")
    cluster = cluster_from(a, "lshmoe bench chaos", fallback=True)
    spec = ChaosSpec(
        failures=a.failures,
        steps=a.steps,
        save_every=a.save_every,
        nodes=cluster.nodes,
        ranks_per_node=cluster.ranks_per_node,
        link=None if (a.link or "none").lower() == "none" else a.link,
        seed=a.seed,
        timeout_s=a.timeout_s,
        emulate=cluster.emulate,
    )
    if a.work_dir:
        Path(a.work_dir).mkdir(parents=True, exist_ok=True)
        res = run(spec, a.set, Path(a.work_dir))
    else:
        with tempfile.TemporaryDirectory(prefix="lshmoe-chaos-") as tmp:
            res = run(spec, a.set, Path(tmp))
    report(a.out, res, a.name)
    ok = res["status"] == 0 and not res["differences"] and res["failures_survived"] == res["failures_injected"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
