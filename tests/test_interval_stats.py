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
