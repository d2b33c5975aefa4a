"""Ledger timing of CUDA collectives: events resolved at step end (no host sync), or `sync` mode.

The resolution arithmetic is checked on the CPU with stand-in events (elapsed times known); the
real CUDA paths run when a GPU is present.
"""

import math

import pytest
import torch

from lshmoe.distributed.comm import Comm
from lshmoe.distributed.ledger import CommLedger, CudaTiming
from lshmoe.distributed.syncs import HostSyncCounter


class FakeEvent:
    """A recorded event at a known device time (ms); `synchronize` counts the waits."""

    waits = 0

    def __init__(self, t_ms: float):
        self.t_ms = t_ms

    def elapsed_time(self, other: "FakeEvent") -> float:
        return other.t_ms - self.t_ms

    def synchronize(self) -> None:
        FakeEvent.waits += 1


def _record(ledger: CommLedger, tag: str, op: str, start_ms: float, end_ms: float, wait_ms: float | None = None):
    rec = ledger.open(op, tag, "ep", (0, 1), 0, (0, 100), (0, 100), "forward")
    rec.cuda = CudaTiming(FakeEvent(start_ms), FakeEvent(end_ms), FakeEvent(wait_ms) if wait_ms is not None else None)
    return rec


def test_events_resolved_at_step_end():
    ledger = CommLedger(0, {0: 0, 1: 1})
    a = _record(ledger, "moe1.dispatch", "all_to_all", 10.0, 14.0)  # blocking: blocked = duration
    b = _record(ledger, "moe1.combine", "all_to_all", 20.0, 26.0, wait_ms=25.0)  # async: waited 1 ms
    c = _record(ledger, "grad", "all_reduce", 22.0, 30.0)  # overlaps b
    host_anchor = a.start
    assert math.isnan(a.end)  # unresolved until the step ends
    step = ledger.end_step()
    assert step.a2a_time_s == pytest.approx(0.004 + 0.006)
    assert step.a2a_exposed_s == pytest.approx(0.004 + 0.001)
    assert step.allreduce_time_s == pytest.approx(0.008)
    assert step.comm_time_s == pytest.approx(0.004 + 0.010)  # union: [10, 14] + [20, 30]
    assert a.start == pytest.approx(host_anchor) and c.end == pytest.approx(host_anchor + 0.020)
    assert a.cuda is None and b.cuda is None and c.cuda is None
    assert step.a2a_bytes_fwd == 2 * 100


def test_seconds_before_step_end_waits_for_that_record_only():
    ledger = CommLedger(0, {0: 0, 1: 0})
    rec = _record(ledger, "moe1.dispatch", "all_to_all", 3.0, 5.5)
    FakeEvent.waits = 0
    assert rec.seconds == pytest.approx(0.0025)
    assert FakeEvent.waits == 1 and rec.cuda is not None  # still resolved with the step


def test_cpu_collectives_unchanged():
    comm = Comm.local("cpu")
    for timing in ("events", "sync"):
        comm.timing = timing
        x = torch.ones(4, 3)
        comm.all_to_all_single(x, None, None, comm.group("ep"), "t")
        rec = comm.ledger.records[-1]
        assert rec.cuda is None and rec.end >= rec.start
    assert comm.host_syncs == 0
    assert HostSyncCounter(True).start().stop() == 0  # nothing to count without CUDA work


@pytest.mark.gpu
@pytest.mark.parametrize("timing,syncs", [("events", 0), ("sync", 4)])  # sync: before and after each of 2
def test_cuda_collective_timing(timing, syncs):
    comm = Comm.local("cuda")
    comm.timing = timing
    x = torch.randn(1024, 256, device="cuda")
    counter = HostSyncCounter(True).start()
    out = comm.all_to_all_single(x, None, None, comm.group("ep"), "moe1.dispatch")
    y = comm.all_reduce(out.sum(0), comm.group("world"), "grad", async_op=True).wait()
    counted = counter.stop()
    assert comm.host_syncs == syncs
    if timing == "events":
        assert counted == 0  # no implicit sync either (explicit synchronize calls are counted by the Comm)
    step = comm.ledger.end_step()
    assert math.isfinite(step.comm_time_s) and step.a2a_time_s >= 0 and step.allreduce_time_s >= 0
    torch.testing.assert_close(y, x.sum(0))


@pytest.mark.gpu
def test_sync_counter_counts_item():
    t = torch.ones(3, device="cuda")
    with HostSyncCounter(True) as c:
        float(t.sum())
        t.nonzero()
    assert c.count >= 2 and len(c.sites) >= 1
