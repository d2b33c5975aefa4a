"""The Lina inference benchmark's summary, tables and verdict on a hand-made recorded run."""

from __future__ import annotations

import dataclasses

import pytest

from lshmoe.bench import lina_infer
from lshmoe.infer.metrics import BatchMetrics, percentile, summarise


def _batch(placement: str, layer_ms: float, rows: list[int], matched: bool | None, replanned: bool) -> dict:
    return dataclasses.asdict(
        BatchMetrics(
            placement=placement,
            layer_s=[layer_ms / 1e3] * 2,
            rows_LW=[rows, rows],
            compute_s=[layer_ms / 2e3] * 2,
            compute_mean_s=[layer_ms / 4e3] * 2,
            batch_s=4 * layer_ms / 1e3,
            estimate_s=0.0,
            ce_loss=5.0,
            matched=[matched] * 2,
            replanned=[replanned] * 2,
            replicas_LE=[[2, 1, 1, 1], [2, 1, 1, 1]] if matched is not None else [[1] * 4] * 2,
        )
    )


def _result(lina_ms: float) -> dict:
    recs = {
        "uniform": [_batch("uniform", 10.0 + i, [300, 100, 0, 0], None, False) for i in range(20)],
        "lina": [_batch("popularity", lina_ms, [100, 100, 100, 100], i % 4 != 0, i % 4 == 0) for i in range(20)],
        "lina-routes": [_batch("popularity", 9.0, [120, 100, 100, 80], True, False) for _ in range(20)],
    }
    return {"records": recs}


def test_percentile_interpolates():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


def test_summary_tables_and_verdict():
    s = lina_infer.rows_of(_result(lina_ms=5.0))
    assert s["uniform"]["load_max_mean"] == pytest.approx(3.0) and s["lina"]["load_max_mean"] == pytest.approx(1.0)
    assert s["lina"]["accuracy"] == pytest.approx(0.75) and s["lina"]["replan_rate"] == pytest.approx(0.25)
    assert s["uniform"]["accuracy"] is None
    assert s["uniform"]["compute_share"] == pytest.approx(0.5)
    assert s["uniform"]["balanced_p95_ms"] == pytest.approx(0.75 * s["uniform"]["layer_p95_ms"])
    assert s["lina"]["per_layer"][0]["max_replicas"] == 2
    main, per = lina_infer.tables(s)
    assert main.count("\n") == 1 + len(lina_infer.MODES) and "| lina-routes |" in main and "75%" in main
    assert per.count("\n") == 1 + 2
    assert "**met**" in lina_infer.verdict(s)  # uniform p95 28.05 ms, lina 5 ms
    slow = lina_infer.rows_of(_result(lina_ms=30.0))
    assert "**not met**" in lina_infer.verdict(slow)
    assert summarise([]) == {}


def test_sharing_note_says_when_ranks_share_cores():
    assert "shared cores" in lina_infer.sharing_note(10**6, 1, [0.5, 0.7])
    assert "shared cores" not in lina_infer.sharing_note(1, 0, [0.0, 0.0])
