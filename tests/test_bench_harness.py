"""The bench harness: one set of cluster flags for every cluster benchmark, `--out` defaulting to
runs/bench/, the emulation check, and the spec -> ranks -> result plumbing (ranks faked)."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import pytest

from lshmoe.bench import harness
from lshmoe.bench.ab_worker import compressor_seconds
from lshmoe.commands.bench import BENCHES

CLUSTER_BENCHES = {
    "cluster": "lshmoe.bench.cluster",
    "quality": "lshmoe.bench.quality",
    "scmoe": "lshmoe.bench.scmoe_bench",
    "locmoe": "lshmoe.bench.locmoe_bench",
    "lina-train": "lshmoe.bench.lina_train",
    "lina-infer": "lshmoe.bench.lina_infer",
    "demo": "lshmoe.bench.demo",
    "chaos": "lshmoe.bench.chaos",
}
CLUSTER_FLAGS = ("--nodes", "--ranks-per-node", "--link", "--set", "--no-emulation")


def _action(p: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in p._actions if flag in a.option_strings)


def _shape(a: argparse.Action) -> tuple:
    """What a flag accepts, its default aside (the link rate differs per benchmark)."""
    return (type(a).__name__, a.dest if a.dest != "links" else "link", a.type, a.nargs, a.metavar, a.const)


def test_every_cluster_benchmark_takes_the_same_cluster_flags():
    shapes = {}
    for name, module in CLUSTER_BENCHES.items():
        p = importlib.import_module(module).parser()
        shapes[name] = {flag: _shape(_action(p, flag)) for flag in CLUSTER_FLAGS}
        a = p.parse_args(["--nodes", "3", "--ranks-per-node", "1", "--link", "2gbit", "--set", "train.steps=5"])
        assert (a.nodes, a.ranks_per_node, a.set, a.no_emulation) == (3, 1, ["train.steps=5"], False), name
        assert getattr(a, "link", None) == "2gbit" or a.links == "2gbit", name
    reference = shapes.pop("quality")
    assert reference["--nodes"][2] is int
    for name, flags in shapes.items():
        assert flags == reference, name


def test_results_go_to_runs_bench_unless_asked():
    assert set(CLUSTER_BENCHES) - {"demo"} <= set(BENCHES)
    for name, (module, _) in BENCHES.items():
        p = importlib.import_module(module).parser()
        assert p.parse_args([]).out == Path("runs/bench"), name
        assert p.parse_args(["--out", "docs/bench"]).out == Path("docs/bench"), name
    demo = importlib.import_module("lshmoe.bench.demo").parser()
    assert demo.parse_args([]).out == Path("runs/demo")


def _args(*argv: str) -> argparse.Namespace:
    return harness.bench_parser("lshmoe bench t", "doc", link="1gbit").parse_args(list(argv))


def test_cluster_from_the_flags(monkeypatch, capsys):
    loop = harness.cluster_from(_args("--no-emulation", "--nodes", "1", "--ranks-per-node", "3"), "t")
    assert loop == harness.Cluster(nodes=1, ranks_per_node=3, link="1gbit", emulate=False)
    assert loop.world == 3 and loop.where() == "3 ranks on loopback"
    monkeypatch.setattr(harness, "check_emulation", lambda: None)
    emu = harness.cluster_from(_args(), "t")
    assert emu.emulate and emu.where(links="link") == "2 emulated nodes x 2 ranks, 1gbit link"
    monkeypatch.setattr(harness, "check_emulation", lambda: "needs root")
    with pytest.raises(SystemExit) as exc:
        harness.cluster_from(_args(), "lshmoe bench t")
    assert exc.value.code == 2
    assert capsys.readouterr().out.strip() == "lshmoe bench t: needs root; rerun with --no-emulation"
    fallback = harness.cluster_from(_args(), "t", fallback=True)
    assert not fallback.emulate and "running on loopback instead" in capsys.readouterr().out


def test_run_ab_hands_the_spec_to_the_ranks_and_returns_rank0s_result(monkeypatch, tmp_path):
    seen = {}

    def fake_ranks(cmd, nodes, rpn, link, emulate):
        spec = json.loads(Path(cmd[-1]).read_text())
        seen.update(cmd=cmd, topo=(nodes, rpn, link, emulate), spec=spec)
        Path(spec["out"]).write_text(json.dumps({"variants": {"a": {"steps": spec["steps_per_round"]}}}))
        return 0

    monkeypatch.setattr(harness, "run_job_ranks", fake_ranks)
    cluster = harness.Cluster(nodes=2, ranks_per_node=1, link="1gbit", emulate=True)
    res = harness.run_ab(harness.ABSpec({"a": {}}, rounds=2, steps_per_round=3), cluster, tmp_path)
    assert res == {"variants": {"a": {"steps": 3}}}
    assert seen["cmd"][1:3] == ["-m", "lshmoe.bench.ab_worker"] and seen["topo"] == (2, 1, "1gbit", True)
    assert seen["spec"]["rounds"] == 2 and seen["spec"]["warmup_rounds"] == 1 and seen["spec"]["impls"] == {}

    monkeypatch.setattr(harness, "run_job_ranks", lambda *a: 3)
    with pytest.raises(RuntimeError, match="the A/B ranks failed with status 3"):
        harness.run_ab(harness.ABSpec({"a": {}}), cluster)


def test_compressor_seconds_are_the_seconds_in_the_layer_stats():
    stats = {1: {"rows_routed": 64.0, "rows_sent": 8.0, "x_hash_s": 0.5, "x_restore_s": 0.25}, 3: {"y_s": 1.0}}
    assert compressor_seconds(stats) == 1.75
    assert compressor_seconds({1: {"rows_routed": 64.0, "rows_sent": 64.0}}) == 0.0
