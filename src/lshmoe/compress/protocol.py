"""The compressor seam (docs/design.md): between local permutation and the dispatch all-to-all.

A compressor turns the N routed rows (grouped by destination expert, `counts_E` rows per expert)
into M payload rows and per-expert payload counts; after the combine all-to-all it restores N output
rows from the M returned ones. Because it sits before the dispatch, every all-to-all of the layer
(forward dispatch and combine, and their backward exchanges) moves M rows instead of N.

Contract of `Compressor` (the layer relies on nothing else):
- `compress(rows_ND, counts_E, positions=None) -> (payload_MD, payload_counts_E, meta)`: payload
  grouped by expert like the input; `meta` is whatever `restore` needs, frozen, never stored on the
  compressor. `positions` (`Positions`: the sequence and the position of each routed row's token) is
  given when the compressor asks for it (`needs_positions`) and the layer's input has them
  ([batch, seq, dim]); otherwise None.
- `needs_positions`: True when `compress` needs `positions` (a causal-safe compressor, which must
  never let a token's output depend on a later token of its sequence); default False, and the layer
  then does not compute them.
- `restore(out_MD, meta) -> out_ND`: one output row per routed row, in the order given to compress.
  Both directions are differentiable, so the backward exchanges move M rows too.
- `set_step(step)`: the training step (seeds random projections, schedules probes). Every rank is
  told the same step, so every rank compresses with the same randomness.
- `active(training) -> bool`: whether to compress in this mode (a compressor may send exact rows at
  evaluation); when False the layer sends the rows uncompressed.
- `probe_due(training) -> bool` and `probe(meta, evaluate, all_reduce)`: an optional off-path
  measurement (e.g. the restore error of the centroids), run after the combine on the same steps on
  every rank: `evaluate(rows_PD, counts_E)` runs the experts exactly on any rows (through the
  dispatcher) and `all_reduce(t)` sums a tensor over the world. Defaults: never due.
- `state_dict()`/`load_state_dict(state)`: running state worth checkpointing, as float64/int64
  tensors keyed by name (empty for a stateless compressor); restored on resume.
- `stats`: numbers of the last call as `Stat`s, each saying how it reduces over steps and ranks;
  the layer merges them into its metrics under the names the compressor chose.
- `wires() -> Wires`: how the payload is encoded on each direction of the two exchanges
  (distributed/wire.py; e.g. FP8 bytes plus scales). Default: every direction in the model dtype.
- `rows_are_tokens`: True when payload row m is a copy of one token and `restore` hands the
  returned rows back unchanged (identity, fp8, int8), so a dispatcher may send a token once per
  destination rank and weight it there (per-destination dedup); False (default) for payloads of
  merged rows (LSH centroids), which dispatchers send as they are.

Implementations register by name in `registry.py` (`--compress NAME`); nothing outside `compress/`
names a concrete compressor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import torch

from lshmoe.distributed.wire import NO_WIRES, Wires


@dataclass(frozen=True, slots=True)
class Positions:
    """Where each routed row comes from in the layer's [batch, seq, dim] input (x_BSD, token t = b S + s)."""

    seq_N: torch.Tensor  # int64 [N]: the sequence (batch row) of the row's token
    pos_N: torch.Tensor  # int64 [N]: the token's position in its sequence


class Reduce(str, Enum):
    """How a per-call number becomes the interval's value in the metrics (over steps and ranks)."""

    SUM = "sum"  # per step, summed over ranks (rows, bytes)
    MEAN = "mean"  # per step, averaged over ranks (seconds, a chosen parameter)
    PER_PROBE = "per_probe"  # averaged over the probes that ran in the interval (see PROBES)
    PROBES = "probes"  # the count of probes that ran; the denominator of PER_PROBE, not reported
    LAST = "last"  # the interval's last value, averaged over ranks (a state: a choice, a measured ratio)


@dataclass(frozen=True, slots=True)
class Stat:
    value: float
    reduce: Reduce = Reduce.MEAN


Evaluate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows_PD, counts_E) -> expert outputs
AllReduce = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class Compressor(Protocol):
    """See the module docstring for the contract."""

    name: str
    rows_are_tokens: bool
    needs_positions: bool

    @property
    def stats(self) -> dict[str, Stat]: ...

    def wires(self) -> Wires: ...

    def compress(
        self, rows_ND: torch.Tensor, counts_E: torch.Tensor, positions: Positions | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]: ...

    def restore(self, out_MD: torch.Tensor, meta: Any) -> torch.Tensor: ...

    def set_step(self, step: int) -> None: ...

    def active(self, training: bool) -> bool: ...

    def probe_due(self, training: bool) -> bool: ...

    def probe(self, meta: Any, evaluate: Evaluate, all_reduce: AllReduce) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class CompressorBase:
    """Defaults for the optional parts of the protocol: always active, no probe, no state, payload
    rows in the model dtype and not token copies, no use for the rows' positions."""

    name = "base"
    rows_are_tokens = False
    needs_positions = False

    def wires(self) -> Wires:
        return NO_WIRES

    def set_step(self, step: int) -> None:
        self.step = step

    def active(self, training: bool) -> bool:
        return True

    def probe_due(self, training: bool) -> bool:
        return False

    def probe(self, meta: Any, evaluate: Evaluate, all_reduce: AllReduce) -> None:
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise KeyError(f"compressor {self.name!r} holds no state, got keys {sorted(state)}")
