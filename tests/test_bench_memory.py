"""`lshmoe bench memory --quick` end to end on a tiny GPT-MoE at W = 1, 2: the files, and numbers that
must hold whatever the machine (the model state is exact, not timed)."""

from __future__ import annotations

import json

import pytest
from cli_util import corpus


@pytest.mark.slow
def test_memory_bench_quick(tmp_path):
    from lshmoe.bench import memory_bench

    data = [f"data.path={corpus(tmp_path)}", "data.vocab_size=300", f"data.cache_dir={tmp_path / 'cache'}"]
    out = tmp_path / "bench"
    argv = ["--quick", "--models", "gpt", "--worlds", "1,2", "--dtypes", "float32", "--acs", "none"]
    argv += [a for s in data for a in ("--set", s)] + ["--out", str(out)]
    assert memory_bench.main(argv) == 0
    for ext in ("json", "md", "png"):
        assert (out / f"memory.{ext}").is_file(), ext
    assert "## Memory per rank" in (tmp_path / "benchmarks.md").read_text()
    rec = json.loads((out / "memory.json").read_text())
    rows = {(r["world"], r["ep"], r["fsdp"]): r for r in rec["rows"]}
    assert set(rows) == {(1, 1, False), (2, 2, False), (2, 2, True), (2, 1, True)}
    for key, r in rows.items():
        m, p = r["measured"], r["plan"]
        assert m["grads_bytes"] > 0 and m["optim_bytes"] == 2 * m["params_bytes"], key  # read before zero_grad
        if r["fsdp"]:  # FSDP pads dim 0 to a multiple of the shard count: a few bytes more
            assert 1.0 <= r["vs_formula"] <= 1.01 and r["fsdp_target_met"], key
            assert abs(2 * r["vs_w1"] - 1) <= 0.02, key  # half the W = 1 state
        else:
            assert m["state_bytes"] == p["state_bytes"], key  # exact without FSDP
        assert m["peak_rss_bytes"] > m["state_bytes"] and m["tokens_per_s"] > 0, key
        assert (m["a2a_bytes"] > 0) == (r["ep"] > 1), key  # no all-to-all at EP 1
    # EP 2 without FSDP holds half the experts, all the dense weights
    assert rows[(1, 1, False)]["measured"]["state_bytes"] > rows[(2, 2, False)]["measured"]["state_bytes"]
    ac = {r["ac"]: r for r in rec["ac_rows"]}
    assert ac["none"]["saved_bytes"] > ac["experts"]["saved_bytes"] > ac["blocks"]["saved_bytes"]
    for mode in ("experts", "blocks"):
        assert ac[mode]["target_met"] and ac[mode]["block_removed_bytes"] >= ac[mode]["expert_hidden_formula_bytes"]
    md = (out / "memory.md").read_text()
    assert "Target 1" in md and "Target 2" in md and "| gpt | 2 | 1 | on |" in md


def test_memory_bench_refuses_bad_flags_in_one_line():
    from lshmoe.bench import memory_bench
    from lshmoe.errors import UserError

    for argv, match in (
        (["--dtypes", "float16"], "--dtypes float16: choose from float32, bf16-mp"),
        (["--worlds", "3"], "each W must be 1 or even"),
        (["--steps", "1"], "--steps 1: must be >= 2"),
    ):
        with pytest.raises(UserError, match=match):
            memory_bench._parse(memory_bench.parser().parse_args(argv))


def test_lsh_accum_report_says_how_the_rate_moves(tmp_path):
    from lshmoe.bench import lsh_accum
    from lshmoe.bench.harness import Cluster

    rows = [
        {
            "from_step": 10,
            "grad_accum": n,
            "micro_batch": 16 // n,
            "rate": rate,
            "layer_rates": {"moe1": rate},
            "rows_routed": 8192.0,
            "rows_sent": 8192.0 * rate,
            "rows_per_group": 512 / n,
            "a2a_bytes": 2**20,
            "tokens_per_s": 1.0,
        }
        for n, rate in ((1, 0.2), (2, 0.3), (4, 0.25))
    ]
    base = lsh_accum._base([])
    lsh_accum.report(tmp_path, "lsh_accum", rows, base, Cluster(nodes=1, ranks_per_node=2), {"steps": 5})
    md = (tmp_path / "lsh_accum.md").read_text()
    assert "| 10 | 4 | 4 | 128 | 25.0% | 25.0% | 1.00 | 1.25x |" in md
    assert "from 20.0% at N = 1 (512 rows per group) to 25.0% at N = 4 (128 rows per group), 1.25x, not monoton" in md
