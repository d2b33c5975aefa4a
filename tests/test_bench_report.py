"""The benchmark report generators on a recorded run, and the analytic cluster model by hand."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from lshmoe.bench import quality, report
from lshmoe.bench.cluster import summarise, table
from lshmoe.bench.simulate import ClusterModel, project

RECORDED = json.loads((Path(__file__).parent / "data" / "ab_result.json").read_text())


def test_summary_of_a_recorded_ab_run():
    rows = {r["variant"]: r for r in summarise(RECORDED, tokens_per_step=8192)}
    base, lsh = RECORDED["variants"]["baseline"], RECORDED["variants"]["lsh"]
    t_b, t_l = statistics.median(base["step_time_s"]), statistics.median(lsh["step_time_s"])
    f = statistics.median([a / s for a, s in zip(base["a2a_time_s"], base["step_time_s"], strict=True)])
    r = sum(lsh["rows_sent"]) / sum(lsh["rows_routed"])
    assert rows["lsh"]["speedup"] == pytest.approx(t_b / t_l)
    b = sum(lsh["a2a_bytes"]) / sum(base["a2a_bytes"]) * base["measured_steps"] / lsh["measured_steps"]
    assert rows["lsh"]["bytes_ratio"] == pytest.approx(b)
    assert rows["lsh"]["amdahl_bound"] == pytest.approx(1 / ((1 - f) + f * b))
    assert rows["lsh"]["compression_rate"] == pytest.approx(r)
    assert rows["baseline"]["speedup"] == pytest.approx(1.0)
    assert rows["lsh"]["tokens_per_s"] == pytest.approx(8192 / t_l)
    n = base["measured_steps"]
    assert rows["baseline"]["a2a_bytes_per_step"] == pytest.approx(sum(base["a2a_bytes"]) / n)
    ratio = base["iface_tx_bytes"] / sum(base["inter_node_bytes"])
    assert rows["baseline"]["iface_over_ledger"] == pytest.approx(ratio)
    parts = rows["baseline"]["breakdown_s"]
    assert sum(parts.values()) == pytest.approx(t_b, rel=0.02)
    md = table(list(rows.values()))
    assert md.count("\n") == 3 and "| lsh |" in md


def test_time_to_target_interpolates():
    evals = [
        {"val_loss": 6.0, "train_time_s": 10.0},
        {"val_loss": 5.0, "train_time_s": 20.0},
        {"val_loss": 4.0, "train_time_s": 30.0},
    ]
    assert quality.time_to_target(evals, 4.5) == pytest.approx(25.0)
    assert quality.time_to_target(evals, 6.5) == pytest.approx(10.0)
    assert quality.time_to_target(evals, 3.0) is None


def test_quality_summary_on_recorded_curves():
    def run(final, speed):
        ev = [
            {"kind": "eval", "step": s, "val_loss": 8 - (8 - final) * s / 100, "train_time_s": s / speed}
            for s in (25, 50, 75, 100)
        ]
        return ev + [{"kind": "summary", "median_tokens_per_s": speed * 1000}]

    runs = {"baseline": {0: run(5.0, 1.0), 1: run(5.2, 1.0)}, "fast": {0: run(5.0, 2.0), 1: run(5.1, 2.0)}}
    rows, target = quality.summarise(runs)
    assert target == 5.2
    fast = next(r for r in rows if r["variant"] == "fast")
    assert fast["val_mean"] == pytest.approx(5.05) and fast["delta_pct"] == pytest.approx(100 * (5.05 / 5.1 - 1))
    assert fast["ttt_reached"] == "2/2" and fast["ttt_speedup"] > 2.0  # twice the speed and a lower curve


def test_quality_quotes_the_exact_loss_and_the_rate():
    def run(exact, compressed, sent):
        ev = {"kind": "eval", "step": 10, "val_loss": exact, "train_time_s": 1.0}
        if compressed is not None:
            ev["val_loss_compressed"] = compressed
        train = [{"kind": "train", "rows_routed": 100, "rows_sent": sent} for _ in range(3)]
        return [*train, ev, {"kind": "summary", "median_tokens_per_s": 1.0}]

    runs = {
        "baseline": {0: run(5.0, None, 100), 1: run(5.2, None, 100)},
        "lsh": {0: run(5.1, 4.9, 25), 1: run(5.3, 5.0, 35)},
    }
    exact = {r["variant"]: r for r in quality.summarise(runs, mode="exact")[0]}
    assert exact["lsh"]["val_mean"] == pytest.approx(5.2) and exact["lsh"]["rate"] == pytest.approx(0.30)
    assert exact["lsh"]["val_compressed_mean"] == pytest.approx(4.95) and exact["baseline"]["rate"] == 1.0
    assert "val_compressed_mean" not in exact["baseline"]
    comp = {r["variant"]: r for r in quality.summarise(runs, mode="compressed")[0]}
    assert comp["lsh"]["val_mean"] == pytest.approx(4.95), "compressed reads val_loss_compressed"
    assert comp["baseline"]["val_mean"] == pytest.approx(5.1), "and val_loss where a run has no such field"


def test_quality_presets_are_valid_and_report(tmp_path):
    from lshmoe.bench.harness import base_config
    from lshmoe.bench.quality_presets import PAPER, PRESETS
    from lshmoe.bench.variants import apply, parse_variant
    from lshmoe.config import SCRATCH_LR

    base = base_config([])
    for preset in PRESETS.values():
        names = []
        for spec in preset.variants(base.train.lr or SCRATCH_LR):
            name, overrides = parse_variant(spec)
            apply(base, overrides, 4)
            names.append(name)
        rows = [
            {
                "variant": n,
                "val_mean": 5 + i / 100,
                "val_std": 0.01,
                "val_per_seed": [5 + i / 100],
                "rate": 0.1 + i / 50,
            }
            for i, n in enumerate(names)
        ]
        md = preset.report(rows, tmp_path, preset.name)
        assert "| baseline |" in md
    assert PAPER in md and (tmp_path / "lsh_ablation_ablation.png").exists()
    lrs = [parse_variant(v)[1].get("train.lr") for v in PRESETS["grad-path"].variants(0.004)]
    assert {"0.002", "0.008"} <= set(lrs)
    from lshmoe.bench.quality import variant_specs  # a preset's variants picked by name, others kept as given

    picked = variant_specs("baseline,exact-gp1,fp8", PRESETS["grad-path"], 0.004)
    assert picked == ["baseline", "exact-gp1:moe.compress=identity;moe.grad_path=1", "fp8"]
    assert variant_specs(None, None, 0.004) == ["baseline", "lsh", "lsh-comp"]


def test_report_sections_and_index(tmp_path):
    out = tmp_path / "bench"
    report.write_section(out, "moe_layer", "Title A", "body a", {"x": 1}, command="lshmoe bench layer")
    report.write_section(out, "cluster", "Title B", "body b ![p](p.png)", {"y": 2}, command="lshmoe bench cluster")
    doc = (tmp_path / "benchmarks.md").read_text()
    assert doc.index("## Title A") < doc.index("## Title B"), "sections follow ORDER"
    assert "](bench/p.png)" in doc and "Command: `lshmoe bench cluster`" in doc
    assert json.loads((out / "cluster.json").read_text())["y"] == 2


def test_report_rebuild_reproduces_the_committed_one(tmp_path, monkeypatch):
    docs = Path(__file__).parents[1] / "docs"
    (tmp_path / "docs" / "bench").mkdir(parents=True)
    for p in (docs / "bench").glob("*.md"):
        (tmp_path / "docs" / "bench" / p.name).write_text(p.read_text())
    monkeypatch.chdir(tmp_path)  # a copy of the repository's docs, rebuilt as `--out docs/bench` does
    rebuilt = report.rebuild_report(Path("docs/bench"))
    assert rebuilt == Path("docs/benchmarks.md")
    assert rebuilt.read_text() == (docs / "benchmarks.md").read_text()


def test_soak_report_rerendered_from_its_json_matches_the_committed_section(tmp_path):
    from lshmoe.bench import soak

    committed = Path(__file__).parents[1] / "docs" / "bench"
    out = tmp_path / "bench"
    assert soak.main(["--from-json", str(committed / "soak.json"), "--out", str(out)]) == 0
    assert (out / "soak.md").read_text() == (committed / "soak.md").read_text()
    assert json.loads((out / "soak.json").read_text()) == json.loads((committed / "soak.json").read_text())


def test_analytic_model_by_hand():
    m = ClusterModel(
        nodes=4,
        gpus_per_node=8,
        inter_gbit_per_node=200.0,
        gpu_tflops=312.0,
        mfu=0.5,
        hidden=1024,
        layers=16,
        moe_every=2,
        tokens_per_gpu=4096,
        top_k=2,
        bytes_per_elem=2,
        rate=0.25,
        lsh_passes=8,
        lsh_bw_eff=0.5,
        hbm_tbps=2.0,
    )
    p = project(m)
    b_gpu = 200e9 / 8 / 8  # 3.125 GB/s per GPU
    t_a2a = 4 * 8 * (4096 * 2 / 4) * 3 * 1024 * 2 / b_gpu  # = 0.12885 s
    t_comp = 96 * 4096 * 16 * 1024**2 / 156e12  # = 0.04229 s
    assert p.t_a2a_s == pytest.approx(t_a2a) and t_a2a == pytest.approx(0.128849, rel=1e-5)
    assert p.t_compute_s == pytest.approx(t_comp) and t_comp == pytest.approx(0.042290, rel=1e-4)
    f = t_a2a / (t_a2a + t_comp)
    assert p.a2a_share == pytest.approx(f)
    assert p.amdahl_bound == pytest.approx(1 / ((1 - f) + 0.25 * f))
    t_lsh = 8 * 8 * 4096 * 2 * 1024 * 2 / (0.5 * 2e12)  # = 1.074 ms
    assert p.t_lsh_s == pytest.approx(t_lsh)
    assert p.speedup == pytest.approx((t_a2a + t_comp) / (0.25 * t_a2a + t_comp + t_lsh))
    # the paper's closed form: k FLOPs / (24 B) (w-1)/(w h), with bytes made explicit
    assert p.paper_ratio == pytest.approx(2 * 156e12 * 2 / (24 * b_gpu) * 3 / (4 * 1024))
    assert math.isclose(p.paper_ratio, 4 * 16 * (4096 * 2 / 4) * 3 * 1024 * 2 / b_gpu / t_comp, rel_tol=1e-9)


def test_soak_growth_ignores_validation_and_checkpoint_spikes():
    from lshmoe.bench.soak import slope_mb_per_kstep, steady

    flat = [{"step": s, "rss_mb": 400.0 + (150.0 if s % 500 == 0 else 0.0)} for s in range(50, 2001, 50)]
    calm = steady(flat, {500, 1000, 1500, 2000})
    assert len(calm) == len(flat) - 4 and slope_mb_per_kstep(calm) == 0.0
    growing = [{"step": s, "rss_mb": 400.0 + 0.1 * s} for s in range(50, 2001, 50)]
    assert abs(slope_mb_per_kstep(steady(growing, {1000})) - 100.0) < 1e-6  # 0.1 MB per step


def test_quality_summary_without_a_baseline_variant_uses_the_first():
    from lshmoe.bench.quality import summarise

    def recs(losses):
        evals = [
            {"kind": "eval", "val_loss": v, "train_time_s": 10.0 * (i + 1), "step": 10 * (i + 1)}
            for i, v in enumerate(losses)
        ]
        return evals + [{"kind": "summary", "median_tokens_per_s": 1000.0}]

    runs = {"top2": {0: recs([6.0, 5.5]), 1: recs([6.0, 5.6])}, "scmoe": {0: recs([5.8, 5.4]), 1: recs([5.7, 5.3])}}
    rows, target = summarise(runs)
    assert target == 5.6 and rows[0]["delta_pct"] == 0.0 and rows[1]["delta_pct"] < 0
    assert rows[1]["ttt_reached"] == "2/2" and rows[1]["ttt_speedup"] > 1.0


def test_rate_curve_reports_each_layers_rate_from_a_runs_metrics(tmp_path):
    import json

    from lshmoe.bench import rate_curve

    recs = [{"kind": "config", "world_size": 2, "config": {"model": {"d_model": 8}, "lsh": {}, "train": {}}}]
    for step in (25, 50, 100):
        layers = {"moe1": {"compression_rate": step / 1000}, "moe3": {"compression_rate": step / 500}}
        recs.append({"kind": "train", "step": step, "layers": layers})
    recs.append({"kind": "eval", "step": 50, "val_loss": 4.5})
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    assert rate_curve.main(["--metrics", str(path), "--out", str(tmp_path / "bench")]) == 0
    md = (tmp_path / "bench" / "lsh_rate.md").read_text()
    assert "| 100 | 10.0% | 20.0% | 4.500 |" in md and "| 25 | 2.5% | 5.0% | - |" in md
    assert (tmp_path / "bench" / "lsh_rate.png").stat().st_size > 0
    path.write_text(json.dumps(recs[0]))
    assert rate_curve.main(["--metrics", str(path), "--out", str(tmp_path / "b2")]) == 2


def test_upcycle_summary_reads_the_trainer_records():
    from lshmoe.bench import upcycle_bench

    def run(step_s, nbytes, rate, share, final, compress="identity", choice=None):
        cfg = {"moe": {"compress": compress}, "auto": {"candidates": "identity,fp8,lsh,lsh+fp8"}}
        layers = {"moe1": {"auto_choice": choice}} if choice is not None else {}
        train = [
            {"kind": "train", "step_time_s": t, "a2a_bytes": nbytes, "compression_rate": rate, "a2a_share": share}
            for t in step_s
        ]
        train[-1]["layers"] = layers
        return [{"kind": "config", "config": cfg}, *train, {"kind": "summary", "final_val_loss": final}]

    runs = {
        # the first window (9.0, 5.0 s) is warm-up: step time and share are medians over the others
        "baseline": {0: run([9.0, 2.0, 2.2], 8e6, 1.0, 0.5, 5.0), 1: run([9.0, 2.1, 2.3], 8e6, 1.0, 0.5, 5.2)},
        "auto": {
            0: run([5.0, 1.0, 1.2], 2e6, 0.4, 0.2, 5.1, "auto", 2.0),
            1: run([5.0, 1.1, 1.3], 2e6, 0.4, 0.2, 5.3, "auto", 3.0),
        },
    }
    rows = {r["variant"]: r for r in upcycle_bench.summarise(runs)}
    base, auto = rows["baseline"], rows["auto"]
    assert base["step_s"] == pytest.approx(2.15) and auto["step_s"] == pytest.approx(1.15)
    assert auto["speedup"] == pytest.approx(2.15 / 1.15) and auto["bytes_vs_base"] == pytest.approx(0.25)
    assert auto["amdahl_bound"] == pytest.approx(1 / (0.5 + 0.5 * 0.25))
    assert auto["val_mean"] == pytest.approx(5.2) and auto["val_delta_pct"] == pytest.approx(100 * (5.2 / 5.1 - 1))
    assert auto["auto_choice"] == "moe1 lsh; moe1 lsh+fp8" and base["auto_choice"] == ""
    md = upcycle_bench.table(list(rows.values()))
    assert "| auto | 2.00 | 25.0% | 40.0% | 20% | 1.15 | 1.87x | 1.60x |" in md


def test_upcycle_quotes_the_exact_loss_and_the_time_to_the_baselines():
    from lshmoe.bench import upcycle_bench

    def run(finals, compressed=None, step_s=1.0):
        train = [{"kind": "train", "step_time_s": step_s, "a2a_bytes": 1e6, "compression_rate": 1.0, "a2a_share": 0.5}]
        evals = [{"kind": "eval", "step": 10 * (i + 1), "val_loss": v} for i, v in enumerate(finals)]
        if compressed is not None:
            evals[-1]["val_loss_compressed"] = compressed
        return [*train * 2, *evals, {"kind": "summary", "final_val_loss": finals[-1]}]

    runs = {
        "baseline": {0: run([6.0, 5.0]), 1: run([6.0, 5.2])},
        "lsh": {0: run([5.6, 4.8], 4.5), 1: run([5.4, 4.9], 4.6)},
    }
    rows = {r["variant"]: r for r in upcycle_bench.summarise(runs)}
    assert rows["lsh"]["val_mean"] == pytest.approx(4.85), "exact: val_loss of the last eval record"
    # the target is the worst baseline seed's final loss, 5.2: reached at 18 and 20 s (1 s a step)
    assert rows["baseline"]["time_to_target_s"] == pytest.approx((18 + 20) / 2)
    assert rows["lsh"]["ttt_speedup"] > 1.0
    comp = {r["variant"]: r for r in upcycle_bench.summarise(runs, "compressed")}
    assert comp["lsh"]["val_mean"] == pytest.approx(4.55) and comp["baseline"]["val_mean"] == pytest.approx(5.1)


def test_lsh_real_scale_reads_the_rate_off_the_curve():
    from lshmoe.bench.lsh_real_scale import GPU_SETTINGS, expected_rate, gpu_table

    curve = [(256, 0.64), (1024, 0.44), (4096, 0.30)]
    assert expected_rate(curve, 512) == (pytest.approx(0.54), "")  # halfway in log2(n)
    assert expected_rate(curve, 1024) == (pytest.approx(0.44), "")
    assert expected_rate(curve, 32)[1].startswith("fewer rows than measured")
    assert expected_rate(curve, 8192) == (0.30, "more rows than measured: the rate at 4096")
    results = [
        {"setting": s, "router": r, "rows_per_group": n, "rate": rate}
        for s in ("defaults (random b=4, L=6)", "recommended (pca b=2, L=8, exact 0.5)")
        for r in ("random", "trained")
        for n, rate in curve
    ]
    cols, rows = gpu_table(results)
    assert len(rows) == len(GPU_SETTINGS) and len(cols) == len(rows[0])
    mixtral = next(r for r in rows if r[1] == 8192 and r[3] == 8)
    assert mixtral[5] == "2,048" and mixtral[6] == "88%"  # 8192 x 2 / 8 rows per group; 7/8 leave the rank


def test_causal_cost_plot_draws_every_mode_from_the_recorded_rows(tmp_path):
    import json
    from pathlib import Path

    from lshmoe.bench.lsh_analysis import CAUSAL, causal_plot

    rows = json.loads((Path(__file__).parent.parent / "docs/bench/lsh_causal.json").read_text())["rows"]
    assert {r["causal"] for r in rows} == {name for name, _, _ in CAUSAL}
    assert causal_plot(rows, tmp_path) == "lsh_causal.png"
    assert (tmp_path / "lsh_causal.png").stat().st_size > 10_000
