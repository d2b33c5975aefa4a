"""The metrics' per-layer reductions over a logging interval (train/metrics.py), on one rank."""

from __future__ import annotations

import pytest
import torch

from lshmoe.compress.protocol import Reduce
from lshmoe.distributed.comm import Comm
from lshmoe.train.metrics import IntervalStats


def test_each_reduce_kind_over_an_interval():
    stats = IntervalStats([1], num_experts=2)
    comm = Comm.local()
    how = {"rows_sent": Reduce.SUM, "hash_s": Reduce.MEAN, "err": Reduce.PER_PROBE, "probes": Reduce.PROBES}
    how |= {"auto_choice": Reduce.LAST, "auto_measured_speedup": Reduce.LAST}
    steps = [  # the measured ratio appears mid-interval, as after auto's check; the choice changes
        {"rows_sent": 10, "hash_s": 0.1, "err": 0.0, "probes": 0, "auto_choice": 0.0},
        {"rows_sent": 20, "hash_s": 0.3, "err": 0.4, "probes": 1, "auto_choice": 3.0, "auto_measured_speedup": 1.5},
        {"rows_sent": 30, "hash_s": 0.2, "err": 0.2, "probes": 1, "auto_choice": 0.0, "auto_measured_speedup": 0.9},
    ]
    for s in steps:
        stats.add({}, comm.ledger.end_step(), torch.ones(1, 2), {1: s}, {1: how})
    rec = stats.reduce(comm, tokens_per_rank_step=1)["layers"]["moe1"]
    assert rec["rows_sent"] == pytest.approx(20.0)  # per step
    assert rec["hash_s"] == pytest.approx(0.2)  # mean over steps
    assert rec["err"] == pytest.approx(0.3) and "probes" not in rec  # mean over the 2 probes
    assert rec["auto_choice"] == 0.0 and rec["auto_measured_speedup"] == pytest.approx(0.9)  # the last values


def test_a_step_from_its_moe_outputs():
    from lshmoe.moe.layer import MoEOutput

    def out(routed, sent, dropped, load):
        return MoEOutput(
            y_TD=torch.zeros(1, 1), aux={}, tokens_per_expert_E=torch.tensor(load), dropped=torch.tensor(dropped),
            rows_routed=routed, rows_sent=sent, stats={"hash_s": 0.5}, reduce={"hash_s": Reduce.MEAN},
        )  # fmt: skip

    stats, comm = IntervalStats([1, 3], num_experts=2), Comm.local()
    values = stats.add_step({"loss": 2.0}, comm.ledger.end_step(), {3: out(8, 2, 1, [5, 3]), 1: out(6, 6, 0, [2, 4])})
    assert values == {"loss": 2.0, "rows_routed": 14, "rows_sent": 8, "dropped_tokens": 1}
    rec = stats.reduce(comm, tokens_per_rank_step=1)
    assert rec["expert_load"] == {"moe1": [2.0, 4.0], "moe3": [5.0, 3.0]}  # in layer order, not dict order
    assert rec["compression_rate"] == pytest.approx(8 / 14) and rec["layers"]["moe3"]["hash_s"] == 0.5
