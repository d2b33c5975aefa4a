"""Named studies of `lshmoe bench quality` (`--preset`): their variants, defaults and extra report.

- `grad-path` (does LSH's gain with `lsh.grad_compensation` need compression at all?): the exact
  baseline at 0.5x, 1x and 2x the learning rate; LSH at the defaults; LSH with grad compensation
  b = 1; each LSH variant with `lsh.causal` on (the default in a GPT-MoE) and off; and the exact model
  given the same gradient-only identity path (`moe.grad_path = 1`). The report adds the gap of every
  variant to the best of the three baselines, and the compression rate.
- `ablation` (the paper's Fig. 6 beside ours): cross-polytope with 2, 4, 6, 8, 10 hashes (b = 4, the
  default bucket count), and cross-polytope against hyperplane at rates held at 10, 15 and 20%
  (`lsh.target=rate`, up to 16 hashes). The report plots the rate and the loss gap against the
  number of hashes and the two families at matched rates, with the paper's statement beside them.

A preset gives the variants, the default steps and the report section's name; every flag of
`lshmoe bench quality` still applies (`--seeds`, `--steps`, `--set`, `--no-emulation`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lshmoe.bench.report import md_table, save_plot

PAPER = (
    "Paper (Nie et al., NeurIPS 2024, Sec. 4.5 and Fig. 6; GPT-MoE 15B fine-tuned on MNLI/SST-2): "
    '"a compression rate of approximately 20% (achieved with about 6 hash functions) is optimal for '
    'maintaining nearly identical convergence as uncompressed models"; more hashes give a higher rate and '
    "better convergence; cross-polytope converges better than spherical-plane hashing at 10, 15 and 20%."
)


@dataclass(frozen=True)
class Preset:
    name: str  # the report section
    steps: int
    variants: Callable[[float], list[str]]  # base learning rate -> variant specs
    report: Callable[[list[dict], Path, str], str]  # (summary rows, out dir, section) -> extra markdown


def _grad_path_variants(lr: float) -> list[str]:
    lsh = "moe.compress=lsh"
    return [
        "baseline",
        f"baseline-lr0.5x:moe.compress=identity;train.lr={lr / 2:g}",
        f"baseline-lr2x:moe.compress=identity;train.lr={2 * lr:g}",
        "lsh",
        f"lsh-causal-off:{lsh};lsh.causal=false",
        f"lsh-gc1:{lsh};lsh.grad_compensation=1",
        f"lsh-gc1-causal-off:{lsh};lsh.grad_compensation=1;lsh.causal=false",
        "exact-gp1:moe.compress=identity;moe.grad_path=1",
    ]


def _ablation_variants(lr: float) -> list[str]:
    out = ["baseline"] + [f"cp-L{L}:moe.compress=lsh;lsh.num_hashes={L}" for L in (2, 4, 6, 8, 10)]
    for fam, short in (("cross_polytope", "cp"), ("hyperplane", "hp")):
        for r in (10, 15, 20):
            out.append(
                f"{short}-r{r}:moe.compress=lsh;lsh.family={fam};lsh.target=rate;lsh.target_value={r / 100:g};"
                "lsh.num_hashes=16"
            )
    return out


def _best_baseline(rows: list[dict]) -> dict | None:
    base = [r for r in rows if r["variant"].startswith("baseline")]
    return min(base, key=lambda r: r["val_mean"]) if base else None


def _grad_path_report(rows: list[dict], out: Path, name: str) -> str:
    best = _best_baseline(rows)
    if best is None:
        return ""
    table = md_table(
        ["variant", "final val loss", f"vs best baseline ({best['variant']})", "per seed vs best (paired)", "rate"],
        [
            [
                r["variant"],
                f"{r['val_mean']:.4f} ± {r['val_std']:.4f}",
                f"{100 * (r['val_mean'] / best['val_mean'] - 1):+.2f}%",
                ", ".join(f"{a - b:+.3f}" for a, b in zip(r["val_per_seed"], best["val_per_seed"], strict=False)),
                f"{100 * r['rate']:.1f}%" if r.get("rate") is not None else "-",
            ]
            for r in rows
        ],
    )
    return f"### Against the best baseline learning rate\n\n{table}\n"


def _ablation_report(rows: list[dict], out: Path, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in rows if r["variant"] == "baseline"), None)
    if base is None:
        return f"{PAPER}\n"

    def gap(r: dict) -> float:
        return 100 * (r["val_mean"] / base["val_mean"] - 1)

    def gap_std(r: dict) -> float:
        return 100 * r["val_std"] / base["val_mean"]

    by = {r["variant"]: r for r in rows}
    Ls = [L for L in (2, 4, 6, 8, 10) if f"cp-L{L}" in by]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(Ls, [100 * by[f"cp-L{L}"]["rate"] for L in Ls], marker="o", label="ours (CP, b = 4)")
    axes[0].axhline(20, color="grey", lw=0.8, ls="--", label="paper: ~20% at 6 hashes")
    axes[0].set(xlabel="hash functions", ylabel="compression rate (%)")
    axes[1].errorbar(
        Ls, [gap(by[f"cp-L{L}"]) for L in Ls], yerr=[gap_std(by[f"cp-L{L}"]) for L in Ls], marker="o", capsize=3
    )
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set(xlabel="hash functions", ylabel="val loss vs baseline (%)")
    for short, label in (("cp", "cross-polytope"), ("hp", "hyperplane")):
        rs = [by[f"{short}-r{r}"] for r in (10, 15, 20) if f"{short}-r{r}" in by]
        axes[2].errorbar(
            [100 * r["rate"] for r in rs], [gap(r) for r in rs], yerr=[gap_std(r) for r in rs], marker="o",
            capsize=3, label=label,
        )  # fmt: skip
    axes[2].axhline(0, color="grey", lw=0.8)
    axes[2].set(xlabel="measured compression rate (%), target 10/15/20%", ylabel="val loss vs baseline (%)")
    for ax in (axes[0], axes[2]):
        ax.legend(fontsize=8)
    png = save_plot(fig, out, f"{name}_ablation")
    table = md_table(
        ["variant", "measured rate", "final val loss", "vs baseline", "paired per seed"],
        [
            [
                r["variant"],
                f"{100 * r['rate']:.1f}%" if r.get("rate") is not None else "-",
                f"{r['val_mean']:.4f} ± {r['val_std']:.4f}",
                f"{gap(r):+.2f}%",
                ", ".join(f"{a - b:+.3f}" for a, b in zip(r["val_per_seed"], base["val_per_seed"], strict=False)),
            ]
            for r in rows
        ],
    )
    return f"### The paper's ablation beside ours\n\n{PAPER}\n\n{table}\n\n![ablation]({png})\n"


PRESETS = {
    "grad-path": Preset("quality_gradpath", 1000, _grad_path_variants, _grad_path_report),
    "ablation": Preset("lsh_ablation", 300, _ablation_variants, _ablation_report),
}
