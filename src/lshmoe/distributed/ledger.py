"""The communication ledger: one record per collective, summarised per step.

Every collective issued through `lshmoe.distributed.comm.Comm` appends a `CommRecord` here: the op, the
group, the phase (forward / backward / optimizer / eval / metrics), the tag of the caller
(e.g. `moe1.dispatch`), the bytes sent to and received from each peer, and the wall-clock interval
from issue to completion. `end_step()` folds the step's records into a `StepComm` summary and clears
them, so memory stays flat over thousands of steps; an optional bounded timeline keeps the raw
records for schedulers and invariant checkers that need them. A caller that never ends a step (a
library user's own loop) still holds at most `max_open` records: past that, the oldest half is folded
into a carried partial summary that the next `end_step()` adds in, so its totals stay exact.

On CUDA a record may carry CUDA events instead of host times (`CudaTiming`, see `Comm.timing`):
`end_step()` waits for them once, at the end of the step, and converts them to the host clock,
anchored at the first record's issue time, so intervals of one step are on one timeline.

Bytes "on the wire" exclude a rank's bytes to itself. For all-to-all the per-peer bytes are exact
(split sizes x row bytes). For all-reduce they follow the ring model every backend approximates:
each rank sends 2(W-1)/W of the buffer to its ring successor.
"""

from __future__ import annotations

import collections
import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from lshmoe.distributed.tags import MoEOp, Tag

PHASES = ("forward", "backward", "optimizer", "eval", "metrics", "setup")
MAX_OPEN = 8192  # records of a step kept as records; the oldest half is folded beyond (a step has ~10 per layer)
A2A_OPS = ("all_to_all",)
ALLREDUCE_OPS = ("all_reduce",)


@dataclass(slots=True)
class CudaTiming:
    """CUDA events of one collective: recorded on the issuing stream before it, after it, and (async)
    when the caller waited for it; `blocked` is then the stream's wait, wait -> end."""

    start: object  # torch.cuda.Event
    end: object = None
    wait: object = None

    def seconds(self, a: object, b: object) -> float:
        b.synchronize()
        return a.elapsed_time(b) / 1e3


@dataclass(slots=True)
class CommRecord:
    """One collective as seen by this rank."""

    op: str
    tag: str
    group: str
    phase: str
    peers: tuple[int, ...]  # global ranks of the group, in group-rank order
    self_index: int  # this rank's index in `peers`
    send_bytes: tuple[int, ...]  # bytes this rank sends to each peer (group-rank order)
    recv_bytes: tuple[int, ...]
    start: float
    end: float = float("nan")
    blocked: float = float("nan")  # seconds the caller waited (= duration for blocking calls)
    nbytes: int = 0  # payload size of this rank's buffer (the tensor handed to the collective)
    cuda: CudaTiming | None = None  # unresolved CUDA events (cleared by `resolve`)

    @property
    def seconds(self) -> float:
        if self.cuda is not None:  # asked before the step ended: wait for this collective alone
            return self.cuda.seconds(self.cuda.start, self.cuda.end)
        return self.end - self.start

    def resolve(self, anchor: CudaTiming, anchor_s: float) -> None:
        """Replace the CUDA events by host-clock times (anchor: an event recorded at host time anchor_s)."""
        t = self.cuda
        self.end = anchor_s + anchor.seconds(anchor.start, t.end)
        self.start = anchor_s + anchor.seconds(anchor.start, t.start)
        if t.wait is not None:
            self.blocked = t.seconds(t.wait, t.end)
        elif self.blocked != self.blocked or not math.isfinite(self.blocked):
            self.blocked = self.end - self.start
        self.cuda = None

    @property
    def wire_send_bytes(self) -> int:
        """Bytes this rank put on the wire (its bytes to itself excluded)."""
        return sum(b for i, b in enumerate(self.send_bytes) if i != self.self_index)


@dataclass(slots=True)
class StepComm:
    """Communication of one step on one rank, by category and phase."""

    a2a_bytes_fwd: int = 0  # payload bytes sent over the wire by the forward all-to-alls
    a2a_bytes_bwd: int = 0
    a2a_meta_bytes: int = 0  # count exchanges (split sizes), any phase
    a2a_calls: int = 0
    a2a_time_s: float = 0.0
    allreduce_bytes: int = 0
    allreduce_time_s: float = 0.0
    other_time_s: float = 0.0  # broadcast, all-gather, barriers
    comm_time_s: float = 0.0  # union of all in-step intervals (overlapping async ops counted once)
    exposed_s: float = 0.0  # time the rank was blocked on communication (what overlap could not hide)
    a2a_exposed_s: float = 0.0  # the same for the all-to-alls alone
    eval_time_s: float = 0.0  # collectives issued by validation (not part of a training step's share)
    inter_node_bytes: int = 0
    intra_node_bytes: int = 0
    by_tag: dict[str, float] = field(default_factory=dict)  # seconds per "tag@phase"

    @property
    def a2a_bytes(self) -> int:
        return self.a2a_bytes_fwd + self.a2a_bytes_bwd

    def as_dict(self, step_time_s: float | None = None) -> dict[str, float]:
        out = {
            "a2a_bytes": self.a2a_bytes,
            "a2a_bytes_fwd": self.a2a_bytes_fwd,
            "a2a_bytes_bwd": self.a2a_bytes_bwd,
            "a2a_meta_bytes": self.a2a_meta_bytes,
            "a2a_time_s": self.a2a_time_s,
            "allreduce_bytes": self.allreduce_bytes,
            "allreduce_time_s": self.allreduce_time_s,
            "other_comm_time_s": self.other_time_s,
            "comm_time_s": self.comm_time_s,
            "exposed_comm_s": self.exposed_s,
            "a2a_exposed_s": self.a2a_exposed_s,
            "inter_node_bytes": self.inter_node_bytes,
            "intra_node_bytes": self.intra_node_bytes,
        }
        if step_time_s:
            out["comm_share"] = min(1.0, self.comm_time_s / step_time_s)
            out["a2a_share"] = min(1.0, self.a2a_time_s / step_time_s)
        return out


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


class CommLedger:
    """Collects `CommRecord`s for the current step and summarises them.

    `node_of` maps a global rank to its node id, so bytes can be split into intra- and inter-node.
    `timeline` (when > 0) keeps that many most recent records across steps for later inspection.
    """

    def __init__(
        self, rank: int = 0, node_of: dict[int, int] | None = None, timeline: int = 0, max_open: int = MAX_OPEN
    ):
        self.rank = rank
        self.node_of = node_of or {}
        self.phase = "forward"
        self._records: list[CommRecord] = []
        self.max_open = max_open
        self._carry = _Carry()
        self.timeline: collections.deque[CommRecord] = collections.deque(maxlen=timeline or None)
        self._keep_timeline = timeline > 0

    def enable_timeline(self, maxlen: int) -> None:
        """Keep the last `maxlen` records across steps (for schedulers' invariant checks)."""
        self.timeline = collections.deque(self.timeline, maxlen=maxlen)
        self._keep_timeline = True

    @contextlib.contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        """Tag every collective issued inside the block with `phase`."""
        assert phase in PHASES, phase
        prev, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = prev

    def open(
        self,
        op: str,
        tag: str,
        group: str,
        peers: tuple[int, ...],
        self_index: int,
        send_bytes: tuple[int, ...],
        recv_bytes: tuple[int, ...],
        phase: str | None = None,
        nbytes: int = 0,
    ) -> CommRecord:
        """Start a record; the caller sets `end` when the collective completes."""
        rec = CommRecord(
            op=op,
            tag=tag,
            group=group,
            phase=phase or self.phase,
            peers=peers,
            self_index=self_index,
            send_bytes=send_bytes,
            recv_bytes=recv_bytes,
            start=time.perf_counter(),
            nbytes=nbytes,
        )
        if len(self._records) >= self.max_open:
            self._fold()
        self._records.append(rec)
        if self._keep_timeline:
            self.timeline.append(rec)
        return rec

    def _fold(self) -> None:
        """Summarise the oldest half of the open records (those complete: an exchange still in flight
        stops the fold) into the carried partial summary, and drop them."""
        half = len(self._records) // 2
        k = 0
        while k < half and _closed(self._records[k]):
            k += 1
        if k == 0:
            return
        head, self._records = self._records[:k], self._records[k:]
        pending = [r for r in head if r.cuda is not None]
        if pending:
            anchor, anchor_s = pending[0].cuda, pending[0].start
            for r in pending:
                r.resolve(anchor, anchor_s)
        carry = self._carry
        intervals = self._add(head, carry.comm)
        if carry.last is not None:
            intervals.append(carry.last)
        merged = _merge(intervals)
        # NOTE: records open in issue order, so every later record starts after the folded ones began:
        # only the last merged interval can still overlap them
        carry.union_s += sum(e - s for s, e in merged[:-1])
        carry.last = merged[-1] if merged else carry.last

    @property
    def records(self) -> list[CommRecord]:
        """The records of the current (not yet ended) step."""
        return self._records

    def resolve(self) -> None:
        """Turn the step's CUDA events into host-clock times (waits for the step's collectives)."""
        pending = [r for r in self._records if r.cuda is not None]
        if pending:
            anchor, anchor_s = pending[0].cuda, pending[0].start
            for r in pending:
                r.resolve(anchor, anchor_s)

    def end_step(self) -> StepComm:
        """Summarise the current step's records (and any folded before) and start a new step."""
        self.resolve()
        carry, self._carry = self._carry, _Carry()
        out = carry.comm
        intervals = self._add(self._records, out)
        if carry.last is not None:
            intervals.append(carry.last)
        out.comm_time_s = carry.union_s + _union_seconds(intervals)
        self._records = []
        return out

    def _add(self, records: list[CommRecord], out: StepComm) -> list[tuple[float, float]]:
        """Add `records` (host times) into `out`; return the intervals of the ones in the step's time."""
        intervals = []
        for r in records:
            seconds = r.seconds
            if r.phase == "eval":
                out.eval_time_s += seconds
                continue
            if r.phase == "metrics":
                continue
            intervals.append((r.start, r.end))
            blocked = r.blocked if r.blocked == r.blocked else seconds
            out.exposed_s += blocked
            key = f"{r.tag}@{r.phase}"
            out.by_tag[key] = out.by_tag.get(key, 0.0) + seconds
            wire = r.wire_send_bytes
            counts = Tag(r.tag).is_moe(MoEOp.COUNTS)
            if r.op in A2A_OPS or counts:  # count exchanges belong to the MoE exchange
                out.a2a_calls += 1
                out.a2a_time_s += seconds
                out.a2a_exposed_s += blocked
                if counts:
                    out.a2a_meta_bytes += wire
                elif r.phase == "backward":
                    out.a2a_bytes_bwd += wire
                else:
                    out.a2a_bytes_fwd += wire
            elif r.op in ALLREDUCE_OPS:
                out.allreduce_bytes += wire
                out.allreduce_time_s += seconds
            else:
                out.other_time_s += seconds
            me = self.node_of.get(self.rank, 0)
            for i, b in enumerate(r.send_bytes):
                if i == r.self_index or not b:
                    continue
                if self.node_of.get(r.peers[i], 0) == me:
                    out.intra_node_bytes += b
                else:
                    out.inter_node_bytes += b
        return intervals


@dataclass(slots=True)
class _Carry:
    """Records folded out of a step that has not ended: their sums, and their busy time as the union of
    the intervals that can no longer overlap later records plus the last one, which still can."""

    comm: StepComm = field(default_factory=StepComm)
    union_s: float = 0.0
    last: tuple[float, float] | None = None


def _closed(r: CommRecord) -> bool:
    """The record's collective has completed (its end is known, or its end event recorded)."""
    return r.cuda.end is not None if r.cuda is not None else r.end == r.end


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out
