"""Soak: thousands of training steps with memory sampled, to show nothing grows.

Runs the default GPT-MoE (with LSH-MoE compression, the path with the most per-step state) on W
spawned gloo ranks through the normal `Trainer.run` loop (logging, evaluation and checkpoints
included) and samples, every `--every` steps on every rank, the resident set size, the ledger's
open records and timeline, and the trainer's in-memory metric buffers. The report fits a line to
RSS over the second half of the run: a flat line (growth of a few MB per thousand steps at most) is
the pass criterion.

Run: `lshmoe bench soak --steps 3000`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from lshmoe.bench.harness import bench_parser, recorded_args
from lshmoe.bench.report import md_table, save_plot, write_section
from lshmoe.config import Config, apply_sets, from_dict
from lshmoe.data import load_data
from lshmoe.testing import run_ranks
from lshmoe.train.gpt_task import GPTTask
from lshmoe.train.loop import Trainer


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _worker(comm, cfg_dict: dict, every: int) -> list[dict]:
    cfg = from_dict(cfg_dict)
    tr = Trainer(cfg, comm, GPTTask())
    samples: list[dict] = []

    def sample(step: int) -> None:
        if step % every == 0:
            samples.append(
                {
                    "step": step,
                    "rss_mb": rss_mb(),
                    "ledger_open": len(comm.ledger.records),
                    "ledger_timeline": len(comm.ledger.timeline),
                }
            )

    tr.run(on_step=sample)
    return samples


def steady(samples: list[dict], quiet: set[int]) -> list[dict]:
    """Samples of ordinary training steps: validation and checkpoint steps allocate their own buffers,
    which the next heap trim returns, so they are left out of the growth measure."""
    return [s for s in samples if s["step"] not in quiet]


def slope_mb_per_kstep(samples: list[dict]) -> float:
    pts = samples[len(samples) // 2 :]
    xs, ys = [p["step"] for p in pts], [p["rss_mb"] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


EVAL_EVERY, SAVE_EVERY = 500, 1000


def parser() -> argparse.ArgumentParser:
    p = bench_parser("lshmoe bench soak", __doc__, cluster=False, name="soak")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--from-json", metavar="PATH", help="re-render the report of a recorded run (its JSON)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.from_json:
        rec = json.loads(Path(a.from_json).read_text())
        report(a.out, rec["samples"], rec["args"], rec["command"], rec["machine"])
        return 0
    cfg = Config()
    cfg.moe.compress = "lsh"
    apply_sets(cfg, a.set)
    cfg.train.steps, cfg.train.progress, cfg.train.eval_every = a.steps, False, EVAL_EVERY
    with tempfile.TemporaryDirectory(prefix="lshmoe-soak-") as tmp:
        cfg.train.out_dir, cfg.train.save_every, cfg.train.keep_last = tmp, SAVE_EVERY, 1
        load_data(cfg.data, print)
        per_rank = run_ranks(
            _worker,
            a.nproc,
            cfg.to_dict(),
            a.every,
            timeout_s=300,
            deadline_s=6 * 3600,
            threads=max(1, (os.cpu_count() or 1) // a.nproc),
        )
    report(a.out, per_rank, recorded_args(a))
    return 0


def report(
    out: Path, per_rank: list[list[dict]], args: dict, command: str | None = None, meta: dict | None = None
) -> None:
    steps, name = args["steps"], args.get("name", "soak")
    quiet = {s for s in range(0, steps + 1) if s and (s % EVAL_EVERY == 0 or s % SAVE_EVERY == 0 or s == steps)}
    rows = []
    for r, samples in enumerate(per_rank):
        calm = steady(samples, quiet)
        warm = next(s for s in calm if s["step"] >= min(200, steps // 4))
        rows.append(
            {
                "rank": r,
                "rss_start_mb": warm["rss_mb"],
                "rss_end_mb": calm[-1]["rss_mb"],
                "rss_max_mb": max(s["rss_mb"] for s in samples),
                "slope_mb_per_1000_steps": slope_mb_per_kstep(calm),
                "ledger_open_max": max(s["ledger_open"] for s in samples),
                "ledger_timeline_max": max(s["ledger_timeline"] for s in samples),
            }
        )
    last = calm[-1]["step"]
    tbl = md_table(
        [
            "rank",
            f"RSS at step {warm['step']} (MB)",
            f"RSS at step {last} (MB)",
            "max RSS, any step (MB)",
            "RSS slope, 2nd half (MB / 1000 steps)",
            "open ledger records (max)",
            "ledger timeline (max)",
        ],
        [
            [
                r["rank"],
                r["rss_start_mb"],
                r["rss_end_mb"],
                r["rss_max_mb"],
                f"{r['slope_mb_per_1000_steps']:+.2f}",
                r["ledger_open_max"],
                r["ledger_timeline_max"],
            ]
            for r in rows
        ],
    )
    print(tbl)
    png = _plot(per_rank, out, name)
    body = (
        f"{steps} training steps of the default GPT-MoE with LSH-MoE compression on {len(per_rank)} gloo ranks, "
        f"through `Trainer.run` (metrics every 10 steps, validation every {EVAL_EVERY}, a checkpoint every "
        f"{SAVE_EVERY}, the C heap trimmed every 10 steps); sampled every {args['every']} steps on every rank. "
        "Start, end and slope use ordinary steps: a sample right after validation or a checkpoint includes "
        "their buffers (the max column and the spikes in the plot), returned at the next trim. Open ledger "
        "records are counted after each step (the ledger is summarised and cleared at every step end; "
        f"collectives issued by logging and validation wait there for the next step).\n\n{tbl}\n\n"
        f"![rss]({png})\n"
    )
    title = "Soak: memory over thousands of steps" + ("" if name == "soak" else f" ({name})")
    write_section(out, name, title, body, {"rows": rows, "samples": per_rank, "args": args}, command=command, meta=meta)


def _plot(per_rank: list[list[dict]], out: Path, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r, samples in enumerate(per_rank):
        ax.plot([s["step"] for s in samples], [s["rss_mb"] for s in samples], label=f"rank {r}")
    ax.set(xlabel="step", ylabel="resident set size (MB)", title="memory during a long run")
    ax.legend(fontsize=8)
    return save_plot(fig, out, name)


if __name__ == "__main__":
    raise SystemExit(main())
