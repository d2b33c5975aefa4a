"""Benchmark results: JSON + markdown section + PNG plots in one folder, and the assembled report.

Each benchmark writes `<out>/<name>.json` (raw numbers and metadata) and `<out>/<name>.md` (one
section: what was measured, the exact command, the machine, the table, its plots); `out` is the
benchmark's `--out` (`runs/bench/` unless asked; `docs/bench/` holds the committed results).
`benchmarks.md` beside that folder is rebuilt from the sections present, in `ORDER`, after every run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ORDER = [
    "summary",
    "moe_layer",
    "train_e2e",
    "hf",
    "data",
    "lsh_compression",
    "lsh_real",
    "lsh_real_scale",
    "lsh_causal",
    "lsh_overhead",
    "lsh_choices",
    "lsh_choices2",
    "lsh_choices3",
    "cluster",
    "cluster_sweep",
    "quality",
    "quality_rate20",
    "lsh_split",
    "quality_4x2",
    "quality_gradpath",
    "lsh_ablation",
    "lsh_rate",
    "lsh_accum",
    "quant_dedup",
    "quality_fp8",
    "quality_bf16",
    "compress_auto",
    "compress_auto_err",
    "upcycle",
    "profile",
    "memory",
    "soak",
    "chaos",
    "scmoe",
    "scmoe_quality",
    "locmoe",
    "locmoe_node_bias",
    "lina_train",
    "lina_infer",
    "gpu_lsh",
]


def machine() -> dict[str, Any]:
    """Where a number was measured."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"{m['cpu']}, {m['cores']} cores{gpu}; torch {m['torch']}, Python {m['python']}; {m['date']}"


def command_line() -> str:
    args = [Path(sys.argv[0]).name if sys.argv[0].endswith("lshmoe") else sys.argv[0], *sys.argv[1:]]
    if args[0].endswith("__main__.py") or args[0] == "-m":
        args[0] = "lshmoe"
    return " ".join(args)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(md_table(headers, rows), flush=True)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def write_section(
    out: Path,
    name: str,
    title: str,
    body: str,
    data: dict[str, Any],
    command: str | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write <out>/<name>.{json,md} and rebuild benchmarks.md beside `out`."""
    meta = meta or machine()
    command = command or command_line()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(
        json.dumps({"name": name, "command": command, "machine": meta, **data}, indent=1, default=str)
    )
    md = f"## {title}\n\nCommand: `{command}`  \nMachine: {machine_line(meta)}\n\n{body.strip()}\n"
    (out / f"{name}.md").write_text(md)
    rebuild_report(out)
    return out / f"{name}.md"


def rebuild_report(out: Path) -> Path:
    """Assemble `out`'s sections into benchmarks.md beside `out` (docs/bench -> docs/benchmarks.md)."""
    out = Path(out)
    rel = f"{out.name}/"  # the sections' links, seen from the report
    sections = []
    for name in ORDER + sorted(p.stem for p in out.glob("*.md") if p.stem not in ORDER):
        p = out / f"{name}.md"
        if p.exists():
            sections.append(p.read_text().replace("](", f"]({rel}").replace(f"]({rel}http", "](http"))
    where = out.as_posix()
    head = (
        f"# lshmoe benchmarks\n\nGenerated from `{where}/*.md`; every section names the command that "
        f"produced it and the machine it ran on (a benchmark writes to `runs/bench/` unless given `--out`: add "
        f"`--out {where}` to rerun a section into this report). Raw numbers are in `{where}/*.json`. Times are "
        "medians of interleaved repetitions unless a section says otherwise.\n\n"
    )
    path = out.parent / "benchmarks.md"
    path.write_text(head + "\n".join(sections))
    return path


def save_plot(fig: Any, out: Path, name: str) -> str:
    """Save a matplotlib figure as <out>/<name>.png; return the markdown-relative file name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f"{name}.png"


def bar_groups(
    ax: Any,
    groups: Sequence[Any],
    series: Sequence[Any],
    value: Callable[[Any, Any], float],
    group_label: Callable[[Any], str],
) -> None:
    """Grouped bars on `ax`: for every group, one bar per series side by side, `value(group, series)` high."""
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        ax.bar([j + i * width for j in range(len(groups))], [value(g, s) for g in groups], width, label=s)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(groups))], [group_label(g) for g in groups])
