"""`lshmoe bench gpu --dry-run`: every stage of the GPU run on the CPU at tiny sizes, results written per stage."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_dry_run_writes_every_stage(tmp_path):
    cmd = [sys.executable, "-m", "lshmoe", "bench", "gpu", "--dry-run", "--out", str(tmp_path), "--budget-s", "400"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "gpu.json").read_text())
    st = data["stages"]
    assert data["dry_run"] and [st[k]["status"] for k in ("tests", "kernels", "layer")] == ["ok"] * 3
    # the CUDA tests were collected (and skip on the CPU); the training smoke ran with LSH
    assert st["tests"]["pytest"]["tests"] > 0 and st["tests"]["pytest"]["failures"] == 0
    smoke = st["tests"]["smoke"]
    assert smoke["status"] == "ok" and math.isfinite(smoke["loss"]) and smoke["host_syncs"] == 0
    points = st["kernels"]["points"]
    assert {p["kernels"] for p in points} == {"triton", "torch"}
    for p in points:
        assert p["ids_agree"] == 1.0 and 0 < p["rate"] < 1 and p["compress_s"] > 0 and p["overhead_200g"] > 0
    impls = [r["impl"] for r in st["layer"]["rows"]]
    assert impls[0] == "lshmoe" and impls[-1] == "raw torch._grouped_mm experts"
    assert all(r.get("tokens_per_s", 0) > 0 for r in st["layer"]["rows"]), st["layer"]["rows"]
    md = (tmp_path / "gpu.md").read_text()
    assert "Dry run on the CPU" in md and "| T | D | L |" in md
