"""The communication ledger: one record per collective, summarised per step.

Every collective issued through `lshmoe.distributed.comm.Comm` appends a `CommRecord` here: the op, the
group, the phase (forward / backward / optimizer / eval / metrics), the tag of the caller
(e.g. `moe1.dispatch`), the bytes sent to and received from each peer, and the wall-clock interval
from issue to completion. `end_step()` folds the step's records into a `StepComm` summary and clears
them, so memory stays flat over thousands of steps; an optional bounded timeline keeps the raw
records for schedulers and invariant checkers that need them.

Bytes "on the wire" exclude a rank's bytes to itself. For all-to-all the per-peer bytes are exact
(split sizes x row bytes). For all-reduce they follow the ring model every backend approximates:
each rank sends 2(W-1)/W of the buffer to its ring successor.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from lshmoe.distributed.tags import MoEOp, Tag

PHASES = ("forward", "backward", "optimizer", "eval", "metrics", "setup")
A2A_OPS = ("all_to_all",)
ALLREDUCE_OPS = ("all_reduce",)


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

    @property
    def seconds(self) -> float:
        return self.end - self.start

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

    def __init__(self, rank: int = 0, node_of: dict[int, int] | None = None, timeline: int = 0):
        self.rank = rank
        self.node_of = node_of or {}
        self.phase = "forward"
        self._records: list[CommRecord] = []
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
        self._records.append(rec)
        if self._keep_timeline:
            self.timeline.append(rec)
        return rec

    @property
    def records(self) -> list[CommRecord]:
        """The records of the current (not yet ended) step."""
        return self._records

    def end_step(self) -> StepComm:
        """Summarise the current step's records and start a new step."""
        out = StepComm()
        intervals = []
        for r in self._records:
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
        out.comm_time_s = _union_seconds(intervals)
        self._records = []
        return out
