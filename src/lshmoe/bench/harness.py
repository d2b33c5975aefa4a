"""The bench harness: the flags the benchmarks share, where results go, and the one way a benchmark
starts the ranks of a job (on an emulated multi-node cluster or on loopback).

A benchmark on the emulated cluster reads

    def parser() -> argparse.ArgumentParser:
        p = bench_parser("lshmoe bench mine", __doc__, link="1gbit")  # cluster flags + --out
        p.add_argument("--steps", type=int, default=100)              # its own flags
        return p

    def main(argv=None) -> int:
        a = parser().parse_args(argv)
        cluster = cluster_from(a, "lshmoe bench mine")              # exits 2 if emulation is unavailable
        base = base_config(a.set)
        result = run_ab(ABSpec(...), cluster)                         # or run_training(cfg, cluster, dir)
        write_section(a.out, "mine", title, body, data)               # bench/report.py
        return 0

Cluster flags (`add_cluster_args`): `--nodes`, `--ranks-per-node`, `--link` (`--links`, a comma list,
where a benchmark sweeps rates), `--set SECTION.KEY=VALUE` (repeatable) and `--no-emulation`; an A/B
measurement adds `--rounds` and `--steps-per-round` (`add_ab_args`). `--out DIR` (`add_out_arg`, every
benchmark) is where `<name>.json/.md/.png` go, `runs/bench/` unless asked; the assembled
`benchmarks.md` is rebuilt beside DIR, so `--out docs/bench` regenerates the committed report
(`docs/bench/` and `docs/benchmarks.md`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lshmoe.bench.netns import check_emulation, run_job_ranks
from lshmoe.config import Config, apply_sets, set_value

DEFAULT_OUT = Path("runs/bench")

# The benchmark model: the default GPT-MoE with 16 sequences per rank, so the expert all-to-all
# (which grows with tokens) rather than the dense all-reduce (which grows with parameters) dominates
# the link, as in the paper's setting.
BENCH_OVERRIDES = {
    "train.batch_size": "16",
    "train.progress": "false",
    "train.eval_batches": "4",
    "dist.threads": "1",
    "dist.timeout_s": "300",
}

# ---------------------------------------------------------------------------------------- flags


def add_out_arg(
    p: argparse.ArgumentParser, default: Path = DEFAULT_OUT, name: str | None = None
) -> argparse.ArgumentParser:
    """`--out DIR`, and with `name` `--name NAME` too: the result is DIR/NAME.{json,md,png}."""
    p.add_argument(
        "--out",
        type=Path,
        default=default,
        metavar="DIR",
        help="where results go (<name>.json/.md/.png; benchmarks.md is rebuilt beside DIR); "
        f"--out docs/bench regenerates the committed report [default: {default}]",
    )
    if name is not None:
        p.add_argument("--name", default=name, help=f"report section name [default: {name}]")
    return p


def add_cluster_args(
    p: argparse.ArgumentParser, *, link: str = "1gbit", links: bool = False, nodes: int = 2, ranks_per_node: int = 2
) -> argparse.ArgumentParser:
    """The flags of every benchmark that runs on the emulated cluster; `links=True` takes a comma list
    of rates (`--links`, also spelled `--link`) for benchmarks that sweep the link."""
    g = p.add_argument_group("cluster")
    g.add_argument(
        "--nodes", type=int, default=nodes, help=f"nodes (emulated, or the topology on loopback) [default: {nodes}]"
    )
    g.add_argument(
        "--ranks-per-node", type=int, default=ranks_per_node, help=f"ranks on each node [default: {ranks_per_node}]"
    )
    if links:
        g.add_argument(
            "--links", "--link", default=link, help=f"inter-node link rates (tc tbf), comma-separated [default: {link}]"
        )
    else:
        g.add_argument("--link", default=link, help=f"inter-node link rate (tc tbf), e.g. 1gbit [default: {link}]")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a field of the benchmark's model / training config (repeatable)",
    )
    g.add_argument("--no-emulation", action="store_true", help="run on loopback (no namespaces, no rate limit)")
    return p


def add_ab_args(p: argparse.ArgumentParser, *, rounds: int = 6, steps_per_round: int = 4) -> argparse.ArgumentParser:
    """The flags of an interleaved A/B measurement (`run_ab`)."""
    p.add_argument(
        "--rounds",
        type=int,
        default=rounds,
        help=f"measured rounds per variant, after a warm-up round [default: {rounds}]",
    )
    p.add_argument(
        "--steps-per-round",
        type=int,
        default=steps_per_round,
        help=f"training steps of a variant per round [default: {steps_per_round}]",
    )
    return p


def bench_parser(
    prog: str,
    doc: str | None,
    *,
    cluster: bool = True,
    out: Path | None = DEFAULT_OUT,
    name: str | None = None,
    **cluster_defaults: object,
) -> argparse.ArgumentParser:
    """A benchmark's parser: its description (the docstring's first paragraph), the cluster flags
    (unless `cluster=False`; `cluster_defaults` go to `add_cluster_args`), `--out` (unless None) and,
    where a benchmark's section can be named, `--name`."""
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    if cluster:
        add_cluster_args(p, **cluster_defaults)
    return add_out_arg(p, out, name) if out is not None else p


# ---------------------------------------------------------------------------------------- where a job runs


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """Where a job's ranks run: `nodes` x `ranks_per_node`, in network namespaces joined by `link`
    (tc tbf; None = unthrottled) when `emulate`, else on loopback with the same topology."""

    nodes: int
    ranks_per_node: int
    link: str | None = None
    emulate: bool = False

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node

    def where(self, links: str = "links") -> str:
        """'2 emulated nodes x 2 ranks, 1gbit links' or '4 ranks on loopback' (for a report's text)."""
        if self.emulate:
            return f"{self.nodes} emulated nodes x {self.ranks_per_node} ranks, {self.link} {links}"
        return f"{self.world} ranks on loopback"


def cluster_from(a: argparse.Namespace, prog: str, *, fallback: bool = False, hint: str = "") -> Cluster:
    """The cluster the cluster flags ask for. When emulation is asked for but unavailable (no root, no
    iproute2): print why and exit with 2 (as for a bad flag), or with `fallback` run on loopback."""
    emulate = not a.no_emulation
    reason = check_emulation() if emulate else None
    if reason and not fallback:
        print(f"{prog}: {reason}; rerun with --no-emulation{hint}", flush=True)
        raise SystemExit(2)
    if reason:
        print(
            f"network emulation unavailable: {reason}; running on loopback instead (communication is nearly free "
            "there, so expect little speedup)"
        )
    link = getattr(a, "link", None)  # a benchmark that sweeps --links sets it per run
    return Cluster(nodes=a.nodes, ranks_per_node=a.ranks_per_node, link=link, emulate=emulate and reason is None)


def run_job(cmd: list[str], cluster: Cluster, what: str) -> None:
    """Run `cmd` as every rank of `cluster`; raise if the job fails (`what` names it in the error)."""
    rc = run_job_ranks(cmd, cluster.nodes, cluster.ranks_per_node, cluster.link, cluster.emulate)
    if rc != 0:
        raise RuntimeError(f"{what} failed with status {rc}")


def run_spec(module_args: list[str], spec: dict, cluster: Cluster, work_dir: Path, what: str) -> dict:
    """Write `spec` (plus `out`, where rank 0 writes its result) to work_dir/spec.json, run
    `python -m <module_args> spec.json` as every rank of `cluster`, and return the result."""
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = work_dir / "spec.json", work_dir / "result.json"
    spec_path.write_text(json.dumps({**spec, "out": str(result_path)}))
    run_job([sys.executable, "-m", *module_args, str(spec_path)], cluster, what)
    return json.loads(result_path.read_text())


# ---------------------------------------------------------------------------------------- the two job kinds


def base_config(sets: list[str]) -> Config:
    """The benchmark model (`BENCH_OVERRIDES` on the defaults), then the `--set` overrides."""
    cfg = Config()
    for k, v in BENCH_OVERRIDES.items():
        set_value(cfg, k, v)
    return apply_sets(cfg, sets)


@dataclass
class ABSpec:
    """An interleaved A/B measurement (`bench/ab_worker.py`): variant name -> config dict."""

    variants: dict[str, dict]
    rounds: int = 6
    warmup_rounds: int = 1
    steps_per_round: int = 4
    evaluate: bool = True
    impls: dict[str, str] = field(default_factory=dict)  # variant -> "deepspeed"


def run_ab(spec: ABSpec, cluster: Cluster, work_dir: Path | None = None) -> dict:
    """Run one interleaved A/B measurement on `cluster` (its files in `work_dir`, or in a temporary
    directory); return rank 0's result (see ab_worker)."""
    if work_dir is None:
        with tempfile.TemporaryDirectory(prefix="lshmoe-ab-") as tmp:
            return run_ab(spec, cluster, Path(tmp))
    return run_spec(["lshmoe.bench.ab_worker"], vars(spec), cluster, work_dir, "the A/B ranks")


def run_training(cfg: Config, cluster: Cluster, out_dir: Path) -> list[dict]:
    """One `lshmoe train` job on `cluster` writing into `out_dir`; returns its metrics records."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.train.out_dir = str(out_dir)
    cfg_path = out_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [sys.executable, "-m", "lshmoe.cli", "train", "--config", str(cfg_path)]
    run_job(cmd, cluster, f"training job in {out_dir}")
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def recorded_args(a: argparse.Namespace) -> dict:
    """The parsed flags as a result's JSON records them (where it was written is not part of the run)."""
    return {k: v for k, v in vars(a).items() if k != "out"}
