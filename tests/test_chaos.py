"""The chaos run in its short form: three ranks killed (one inside a save) on the emulated 2 x 2
cluster (loopback with the same topology without root), the job restarting each time; the final
weights, optimizer state and losses equal an uninterrupted run bitwise. `lshmoe bench chaos` is the
full run (10 failures)."""

from __future__ import annotations

import json

import pytest
from cli_util import corpus

from lshmoe.bench import chaos
from lshmoe.bench.netns import check_emulation

pytestmark = pytest.mark.slow


def test_schedule_is_seeded_distinct_and_hits_saves():
    spec = chaos.ChaosSpec(failures=10, steps=120, save_every=10)
    a, b = chaos.schedule(spec), chaos.schedule(spec)
    assert a == b and len(a) == 10 and len({f.step for f in a}) == 10
    saves = [f for f in a if f.kind == "killsave"]
    assert len(saves) >= 3 and all(f.step % 10 == 0 for f in saves)
    assert all(0 <= f.rank < 4 and 1 <= f.step < 120 for f in a)
    assert chaos.schedule(chaos.ChaosSpec(failures=10, steps=120, save_every=10, seed=1)) != a


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_short_chaos_run_survives_every_failure_bitwise(tmp_path, fsdp):
    spec = chaos.ChaosSpec(failures=3, steps=16, save_every=4, timeout_s=30, emulate=check_emulation() is None)
    sets = [
        f"dist.fsdp={str(fsdp).lower()}",
        f"data.path={corpus(tmp_path)}",
        "data.vocab_size=300",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.d_model=32",
        "moe.d_expert=32",
        "model.seq_len=32",
    ]
    res = chaos.run(spec, sets, tmp_path / "work")
    chaos.report(tmp_path / "docs" / "bench", res)
    assert res["status"] == 0, res
    assert res["failures_injected"] == res["failures_survived"] == 3
    assert [r["fault"] for r in res["failures"]] == res["schedule"]
    assert any(r["during_save"] for r in res["failures"])
    assert res["differences"] == [], res["differences"]
    for r in res["failures"]:
        assert 0 <= r["steps_lost"] <= spec.save_every, r
        assert r["wall_lost_s"] > 0 and r["detect_s"] > 0 and r["restart_s"] > 0, r
    saved = json.loads((tmp_path / "docs" / "bench" / "chaos.json").read_text())
    assert saved["failures_survived"] == 3 and saved["differences"] == []
    assert "bitwise equal" in (tmp_path / "docs" / "bench" / "chaos.md").read_text()
