"""The GPU run's two commands on the CPU: `lshmoe bench gpu --dry-run` (every stage at tiny sizes, results
written per stage) and the checkout's GPU test stage `.ci/gpu-tests` (the CUDA tests collected; they skip)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_writes_every_stage(tmp_path):
    cmd = [sys.executable, "-m", "lshmoe", "bench", "gpu", "--dry-run", "--out", str(tmp_path), "--budget-s", "400"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "gpu.json").read_text())
    st = data["stages"]
    assert data["dry_run"] and [st[k]["status"] for k in ("smoke", "kernels", "layer")] == ["ok"] * 3
    smoke = st["smoke"]  # the training smoke ran with LSH
    assert math.isfinite(smoke["loss"]) and smoke["host_syncs"] == 0
    points = st["kernels"]["points"]
    assert {p["kernels"] for p in points} == {"triton", "torch"}
    for p in points:
        assert p["ids_agree"] == 1.0 and 0 < p["rate"] < 1 and p["compress_s"] > 0 and p["overhead_200g"] > 0
    impls = [r["impl"] for r in st["layer"]["rows"]]
    assert impls[0] == "lshmoe" and impls[-1] == "raw torch._grouped_mm experts"
    assert all(r.get("tokens_per_s", 0) > 0 for r in st["layer"]["rows"]), st["layer"]["rows"]
    md = (tmp_path / "gpu.md").read_text()
    assert "Dry run on the CPU" in md and "| T | D | L |" in md


def test_gpu_test_stage_collects_the_cuda_tests(tmp_path):
    """`.ci/gpu-tests -m gpu` on the CPU: the CUDA tests of the kernel and GPU files are found, and skip."""
    xml = tmp_path / "junit.xml"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        [str(ROOT / ".ci" / "gpu-tests"), "-m", "gpu", f"--junitxml={xml}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,  # the script finds the checkout itself
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    files = {case.get("classname", "").split(".")[-1] for case in suite.iter("testcase")}
    assert {"test_kernels", "test_gpu", "test_comm_timing"} <= files, files
    assert int(suite.get("failures")) == int(suite.get("errors")) == 0
    if not _cuda():
        assert int(suite.get("skipped")) == int(suite.get("tests")) > 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
