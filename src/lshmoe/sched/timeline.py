"""The timeline of all-to-alls and gradient all-reduce chunks on one rank, and Lina's invariants over it.

Built from the ledger's records (kept across steps with `CommLedger.enable_timeline`). Invariants of
the priority scheduler (each returns a list of violations, empty when it holds):
  (i)   no gradient chunk starts while an all-to-all is running on this rank;
  (ii)  no gradient chunk starts inside a backward MoE window (from the start of a layer's combine
        backward all-to-all to the end of its dispatch backward all-to-all);
  (iv)  per step, the chunks' bytes add up to the dense gradient bytes and their number is
        sum over gradients of ceil(bytes / chunk size).
Also measured: how long each all-to-all was delayed by a chunk already in flight when it started
(bounded by one chunk's transfer time under the priority policy).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from lshmoe.distributed.ledger import CommRecord
from lshmoe.distributed.tags import MoEOp, Tag


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "a2a" or "chunk"
    tag: str
    phase: str
    start: float
    end: float
    nbytes: int


def timeline(records: Iterable[CommRecord]) -> list[Event]:
    out = []
    for r in records:
        if r.op == "all_to_all" and r.phase in ("forward", "backward"):
            out.append(Event("a2a", r.tag, r.phase, r.start, r.end, r.nbytes))
        elif r.op == "all_reduce" and r.tag.startswith("grad.chunk."):
            out.append(Event("chunk", r.tag, r.phase, r.start, r.end, r.nbytes))
    return sorted(out, key=lambda e: e.start)


def backward_windows(events: list[Event]) -> list[tuple[float, float]]:
    """[start of a layer's combine backward all-to-all, end of its dispatch backward all-to-all]."""
    windows, open_at = [], {}
    for e in events:
        if e.kind != "a2a" or e.phase != "backward":
            continue
        tag = Tag(e.tag)
        layer = tag.layer
        if layer is None:
            continue
        if tag.op == MoEOp.COMBINE.value and layer not in open_at:
            open_at[layer] = e.start
        elif tag.op == MoEOp.DISPATCH.value and layer in open_at:
            windows.append((open_at.pop(layer), e.end))
    return windows


def check_no_chunk_during_a2a(events: list[Event]) -> list[str]:
    a2a = [(e.start, e.end, e.tag) for e in events if e.kind == "a2a"]
    bad = []
    for c in (e for e in events if e.kind == "chunk"):
        for s, t, tag in a2a:
            if s < c.start < t:
                bad.append(f"{c.tag} started at {c.start:.6f} while {tag} ran [{s:.6f}, {t:.6f}]")
    return bad


def check_no_chunk_in_windows(events: list[Event]) -> list[str]:
    wins = backward_windows(events)
    return [
        f"{c.tag} started inside a backward MoE window [{s:.6f}, {t:.6f}]"
        for c in (e for e in events if e.kind == "chunk")
        for s, t in wins
        if s < c.start < t
    ]


def check_chunk_bytes(events: list[Event], grad_numels: list[int], element_size: int, chunk_bytes: int) -> list[str]:
    chunks = [e for e in events if e.kind == "chunk"]
    want_bytes = sum(grad_numels) * element_size
    want_count = sum(max(1, math.ceil(n * element_size / chunk_bytes)) for n in grad_numels)
    got_bytes = sum(e.nbytes for e in chunks)
    bad = []
    if got_bytes != want_bytes:
        bad.append(f"chunk bytes {got_bytes} != gradient bytes {want_bytes}")
    if len(chunks) != want_count:
        bad.append(f"{len(chunks)} chunks, expected {want_count}")
    return bad


def a2a_delays(events: list[Event]) -> list[float]:
    """For each all-to-all, how long a chunk already in flight when it started kept running (0 if none)."""
    chunks = [e for e in events if e.kind == "chunk"]
    out = []
    for a in (e for e in events if e.kind == "a2a"):
        overlap = [c.end - a.start for c in chunks if c.start <= a.start < c.end]
        out.append(max(overlap, default=0.0))
    return out
