"""The one door to torch.distributed (docs/design.md §2).

`Comm` owns this rank's process groups and its `CommLedger`. Every collective in lshmoe is a
method call here, so every byte that crosses ranks is recorded with its op, group, phase, tag,
per-peer bytes and wall time. Nothing else in the package calls `torch.distributed` collectives.

A group of size one never touches torch.distributed: its collectives are local copies, so a
single-process run needs no process group at all.

Failures of a collective (a peer that died, a timeout) are re-raised as `DistError` naming this
rank, the op, the tag and the group, so a user sees which exchange broke instead of a bare gloo trace.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lshmoe.distributed.ledger import CommLedger, CommRecord
from lshmoe.errors import DistError


@dataclass(frozen=True)
class Group:
    """A named process group: its global ranks, this rank's index, and the torch handle."""

    name: str
    ranks: tuple[int, ...]
    index: int
    pg: Any = None  # torch ProcessGroup; None for a group of size 1

    @property
    def size(self) -> int:
        return len(self.ranks)


class Pending:
    """An asynchronous collective in flight; `wait()` returns its result and closes the record."""

    def __init__(self, work: Any, result: torch.Tensor, record: CommRecord, comm: Comm, is_async: bool = False):
        self._work, self._result, self._record, self._comm = work, result, record, comm
        self._done, self._async = False, is_async

    def wait(self) -> torch.Tensor:
        if not self._done:
            t0 = time.perf_counter()
            if self._work is not None:
                self._comm._guard(self._record, self._work.wait)
            self._comm._close(self._record, self._result)
            self._record.blocked = self._record.end - (t0 if self._async else self._record.start)
            self._done = True
            if self._record.op == "all_to_all":
                for listener in self._comm.listeners:
                    listener.a2a_end(self._record.tag, self._record.phase)
        return self._result


def _row_bytes(x: torch.Tensor) -> int:
    return math.prod(x.shape[1:]) * x.element_size()


class Comm:
    """Collectives for one rank, all recorded in `self.ledger`."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        groups: dict[str, Group],
        ledger: CommLedger,
        device: torch.device,
        node_of: dict[int, int],
    ):
        self.rank = rank
        self.world_size = world_size
        self.groups = groups
        self.ledger = ledger
        self.device = device
        self.node_of = node_of
        self.seq = 0  # collectives issued by this rank (published by the watchdog)
        self.watchdog = None  # lshmoe.distributed.watchdog.Watchdog when peers are monitored
        self.listeners: list = []  # told when each all-to-all begins and ends (Lina's gradient scheduler)

    @classmethod
    def local(cls, device: str | torch.device = "cpu") -> Comm:
        """A single-process Comm: every group has size one; no torch.distributed needed."""
        groups = {n: Group(n, (0,), 0, None) for n in ("world", "ep", "edp", "node", "lane", "grad")}
        return cls(0, 1, groups, CommLedger(0, {0: 0}), torch.device(device), {0: 0})

    def group(self, name: str) -> Group:
        return self.groups[name]

    # ----------------------------------------------------------------------------- bookkeeping

    def _sync(self, x: torch.Tensor) -> None:
        # NOTE: CUDA collectives are asynchronous on their stream; synchronise so the ledger's
        # wall time covers the transfer, not just the launch.
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    def _open(
        self,
        op: str,
        tag: str,
        group: Group,
        send: tuple[int, ...],
        recv: tuple[int, ...],
        phase: str | None,
        x: torch.Tensor,
    ) -> CommRecord:
        self._sync(x)
        self.seq += 1
        if op == "all_to_all":
            for listener in self.listeners:
                listener.a2a_begin(tag, phase or self.ledger.phase)
        return self.ledger.open(
            op, tag, group.name, group.ranks, group.index, send, recv, phase, nbytes=x.numel() * x.element_size()
        )

    def _close(self, rec: CommRecord, x: torch.Tensor) -> None:
        self._sync(x)
        rec.end = time.perf_counter()

    def _guard(self, rec: CommRecord, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as e:  # type: ignore[attr-defined]
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            verdict = self.watchdog.diagnose() if self.watchdog is not None else "peer unknown (no watchdog)"
            if self.watchdog is not None:
                self.watchdog.post_abort(verdict)
            raise DistError(
                f"rank {self.rank}: {rec.op} '{rec.tag}' in group '{rec.group}' "
                f"(ranks {list(rec.peers)}) failed: {verdict} [{first[:200]}]"
            ) from e

    def report_failure(self, exc: BaseException) -> None:
        """Before this rank exits on an error: tell the peers (a peer's own failure is already posted)."""
        if self.watchdog is None:
            return
        if not isinstance(exc, DistError):
            self.watchdog.mark_failed(
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            )
        if self.rank == 0:
            time.sleep(2 * self.watchdog.interval_s)  # rank 0 may host the store: let the peers read it
        self.watchdog.stop()

    # ----------------------------------------------------------------------------- collectives

    def all_to_all_single(
        self,
        x: torch.Tensor,
        out_splits: list[int] | None,
        in_splits: list[int] | None,
        group: Group,
        tag: str,
        phase: str | None = None,
        async_op: bool = False,
    ) -> torch.Tensor | Pending:
        """Uneven-split all-to-all along dim 0 (rows). Splits are row counts per group rank."""
        w = group.size
        if in_splits is None:
            assert x.shape[0] % w == 0, "equal-split all-to-all needs rows divisible by the group size"
            in_splits = [x.shape[0] // w] * w
        if out_splits is None:
            out_splits = [x.shape[0] // w] * w
        rb = _row_bytes(x)
        rec = self._open(
            "all_to_all", tag, group, tuple(s * rb for s in in_splits), tuple(s * rb for s in out_splits), phase, x
        )
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        if w == 1:
            out.copy_(x)
            work = None
        else:
            work = self._guard(
                rec,
                dist.all_to_all_single,
                out,
                x.contiguous(),
                out_splits,
                in_splits,
                group=group.pg,
                async_op=async_op,
            )
        pending = Pending(work if async_op else None, out, rec, self, async_op)
        return pending if async_op else pending.wait()

    def all_reduce(
        self, x: torch.Tensor, group: Group, tag: str, op: str = "sum", phase: str | None = None, async_op: bool = False
    ) -> torch.Tensor | Pending:
        """In-place all-reduce (`sum`, `max`, `min`); bytes follow the ring model."""
        w = group.size
        nbytes = x.numel() * x.element_size()
        ring = 2 * (w - 1) * nbytes // w if w > 1 else 0
        nxt, prv = (group.index + 1) % w, (group.index - 1) % w
        send = tuple(ring if i == nxt and w > 1 else 0 for i in range(w))
        recv = tuple(ring if i == prv and w > 1 else 0 for i in range(w))
        rec = self._open("all_reduce", tag, group, send, recv, phase, x)
        work = None
        if w > 1:
            rop = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
            work = self._guard(rec, dist.all_reduce, x, op=rop, group=group.pg, async_op=async_op)
        pending = Pending(work if async_op else None, x, rec, self, async_op)
        return pending if async_op else pending.wait()

    def broadcast(
        self, x: torch.Tensor, src_index: int, group: Group, tag: str, phase: str | None = None
    ) -> torch.Tensor:
        """In-place broadcast from the group member at `src_index`."""
        w = group.size
        nbytes = x.numel() * x.element_size()
        send = tuple(nbytes if group.index == src_index and i != src_index else 0 for i in range(w))
        recv = tuple(nbytes if i == src_index and group.index != src_index else 0 for i in range(w))
        rec = self._open("broadcast", tag, group, send, recv, phase, x)
        if w > 1:
            self._guard(rec, dist.broadcast, x, src=group.ranks[src_index], group=group.pg)
        self._close(rec, x)
        rec.blocked = rec.end - rec.start
        return x

    def all_gather(self, x: torch.Tensor, group: Group, tag: str, phase: str | None = None) -> torch.Tensor:
        """Gather equal-shaped tensors from every member; returns [group.size, *x.shape]."""
        w = group.size
        nbytes = x.numel() * x.element_size()
        send = tuple(nbytes if i != group.index else 0 for i in range(w))
        rec = self._open("all_gather", tag, group, send, send, phase, x)
        out = x.new_empty((w, *x.shape))
        if w == 1:
            out[0].copy_(x)
        else:
            self._guard(rec, dist.all_gather, list(out.unbind(0)), x.contiguous(), group=group.pg)
        self._close(rec, x)
        rec.blocked = rec.end - rec.start
        return out
