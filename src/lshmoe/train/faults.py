"""Fault injection for testing recovery: the trainer calls a `FaultInjector` at named points.

`fault.inject` (flag `--fault`) is a comma-separated list of `kind:rank:step` (e.g. `kill:1:5,killsave:0:12`):

- `kill`: SIGKILL this rank at the start of step `step` (after `step` steps are done);
- `stall`: sleep forever at the start of step `step` (the watchdog must name it);
- `nan`: fill one expert gradient with NaN after the backward of step `step`;
- `killsave`: SIGKILL this rank inside the save of the checkpoint `step_<step>`, after its own shards
  are written and before the ranks agree to commit (so the save is left incomplete, whichever rank).

Each fault fires once per output directory: before it acts, the rank appends it to
`<out_dir>/faults.fired` (one JSON line: the fault, the step, the wall time), and an injector built
later (a restarted job) skips the faults listed there. So one fault list drives a whole sequence of
failures and restarts (`--max-restarts`, `lshmoe bench chaos`), and the file records when each happened.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lshmoe.config import Fault, FaultConfig

FIRED_FILE = "faults.fired"


def read_fired(out_dir: str | Path) -> list[dict]:
    """The faults that have fired in this output directory, in order (torn last lines are ignored)."""
    path = Path(out_dir) / FIRED_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class FaultInjector:
    """This rank's pending faults and the hooks the trainer calls; with no faults every hook is a no-op."""

    def __init__(self, spec: str, rank: int, out_dir: str | Path):
        self.rank, self.out_dir = rank, Path(out_dir)
        fired = {rec.get("fault") for rec in read_fired(out_dir)}
        self.pending = [f for f in FaultConfig(inject=spec).faults() if f.rank == rank and str(f) not in fired]

    def _take(self, kind: str, step: int) -> Fault | None:
        for f in self.pending:
            if f.kind == kind and f.step == step:
                self.pending.remove(f)
                self._record(f)
                return f
        return None

    def _record(self, f: Fault) -> None:
        print(f"[lshmoe] rank {self.rank}: injected fault '{f.kind}' at step {f.step}", file=sys.stderr, flush=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out_dir / FIRED_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps({"fault": str(f), "step": f.step, "time": time.time()}) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------------------ hook points

    def step_start(self, step: int) -> None:
        """Before step `step` runs: `kill` and `stall`."""
        if self._take("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._take("stall", step):
            while True:
                time.sleep(3600)

    def after_backward(self, step: int, poison: Callable[[], None]) -> None:
        """After the backward of step `step`: `nan` calls `poison()` (which corrupts a gradient)."""
        if self._take("nan", step):
            poison()

    def inside_save(self, step: int) -> None:
        """Inside the save of checkpoint `step`, this rank's shards written, nothing committed: `killsave`."""
        if self._take("killsave", step):
            os.kill(os.getpid(), signal.SIGKILL)
